"""CNN/DailyMail stories (the cnndm task), read story by story as the stream needs them.

`datasets/cnndm/url_lists/all_{train,val,test}.txt` lists article URLs; the story of URL u is
`datasets/cnndm/cache_{mode}/{cnn|dailymail}/stories/<sha1(u)>.story`.
"""

import hashlib
import random
import re
from collections.abc import Iterator

import ftfy

from lm_human_preferences.utils import storage
from lm_human_preferences.utils.errors import UserError

BASE = "https://openaipublic.blob.core.windows.net/lm-human-preferences/datasets/cnndm"


def story_path(url: str) -> str:
    if any(site in url for site in ("dailymail.co.uk", "mailonsunday.ie", "lib.store.yahoo.net")):
        site = "dailymail"
    elif "cnn.com" in url or "cnn.hk" in url:
        site = "cnn"
    else:
        raise UserError(f"cnndm URL list holds {url!r}, which is neither a CNN nor a Daily Mail article")
    return f"{site}/stories/{hashlib.sha1(url.encode('utf-8')).hexdigest()}.story"


def clean_up_start(text: str) -> str:
    """Strip bylines, '(CNN) --' datelines and 'UPDATED:' stamps from the start of a story."""
    if text[:2] == "By":
        text = "\n".join(text.split("\n")[2:])
    text = re.split(r"\(CNN\) +--", text)[-1]
    text = re.split(r"\(CNN\)", text[:100])[-1] + text[100:]
    text = re.sub(r"^and \w+\n", "", text)
    text = re.split(r".*UPDATED:\s+[0-9]{2}:[0-9]{2}.*[2011|2012|2013|2014|2015]", text)[-1]
    return text.replace("’", "'").replace("‘", "'").strip()


def cnndm_texts(mode: str, seed: int) -> Iterator[str]:
    if mode == "valid":
        mode = "val"
    urls = storage.fetch(f"{BASE}/url_lists/all_{mode}.txt").read_text(encoding="utf-8").split("\n")
    urls = [u.strip() for u in urls if u.strip()]
    random.Random(seed).shuffle(urls)
    for url in urls:
        text = storage.fetch(f"{BASE}/cache_{mode}/{story_path(url)}").read_text(encoding="utf-8")
        text = re.sub(r"\n{3,}", "\n\n", ftfy.fix_text(clean_up_start(text)))
        yield text.split("@highlight")[0].strip()
