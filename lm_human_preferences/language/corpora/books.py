"""Book passages (the books tasks: sentiment, descriptiveness).

The original's `datasets/book_passages/{train,test}.jsonl` (one JSON string per line) was lost
when its storage moved: the URLs answer 404. The loader still reads them from wherever they
are served (or a mirror, LMHP_MIRROR) and says clearly what to use instead when they are gone.
The books experiments name a fallback (`books|labels:<label file>`, language/datasets.py): the
queries of their released label file, which were sampled from these passages.
"""

import json
import random
from collections.abc import Iterator

from lm_human_preferences.utils import storage
from lm_human_preferences.utils.errors import UserError

URL = "https://openaipublic.blob.core.windows.net/lm-human-preferences/datasets/book_passages/{mode}.jsonl"

SUBSTITUTES = (
    "book_passages is no longer served (its URLs answer 404). Pick a substitute with "
    "--task.query_dataset: a local path or URL of a .jsonl (one JSON string, or object with a "
    "'text' field, per line) or .txt file (one passage per line) of book passages; or "
    "'labels:<label file>' to use the queries of a label file, e.g. "
    "labels:gs://lm-human-preferences/labels/descriptiveness/offline_5k.json"
)


def served(mode: str) -> bool:
    """Whether the `mode` split of book_passages is served (at its URL or the LMHP_MIRROR mirror)."""
    return storage.exists(URL.format(mode=mode))


def books_texts(mode: str, seed: int) -> Iterator[str]:
    url = URL.format(mode=mode)
    if not served(mode):
        raise UserError(f"{url}: not found. {SUBSTITUTES}")
    path = storage.fetch(url)
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line) for line in f if line.strip()]
    random.Random(seed).shuffle(texts)
    yield from texts
