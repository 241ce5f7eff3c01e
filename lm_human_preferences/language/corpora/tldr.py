"""Reddit TL;DR posts (the tldr task): `tldr/{train,valid}-subset.json`, objects with `content`."""

import json
import random
import re
from collections.abc import Iterator

import ftfy

from lm_human_preferences.utils import storage
from lm_human_preferences.utils.errors import UserError

URL = "https://openaipublic.blob.core.windows.net/lm-human-preferences/tldr/{mode}-subset.json"


def tldr_texts(mode: str, seed: int) -> Iterator[str]:
    if mode == "test":
        mode = "valid"  # as the original: the validation subset serves as the test split
    url = URL.format(mode=mode)
    path = storage.fetch(url)
    try:
        posts = json.loads(path.read_text(encoding="utf-8"))
        contents = [post["content"] for post in posts]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as e:
        raise UserError(f"{url}: expected a JSON list of objects with a 'content' field ({e!r}); "
                        "delete the cached copy and try again") from None
    random.Random(seed).shuffle(contents)
    for text in contents:
        yield re.sub(r"\n{3,}", "\n\n", ftfy.fix_text(text)).strip()
