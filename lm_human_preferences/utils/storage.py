"""Where files come from: local paths, https:// URLs and the original's gs:// buckets.

The original read everything from `gs://gpt-2/...` and `gs://lm-human-preferences/...`.
Those buckets are gone; the same files are served over HTTPS from OpenAI's public blob
store, so gs:// paths are mapped there. Remote files are downloaded once into the cache
(utils/cache.py: laid out as the URLs are) and reused. Downloads are atomic (temporary name +
rename) and guarded by a file lock, so concurrent processes on one machine wait for a single
downloader and never see a half-written file.

Only complete files enter the cache: a body shorter than its Content-Length, or one that does not
match the Content-MD5 the server sent, is retried, and a body sent without Content-Length must pass
its format's own completeness check (utils/completeness.py). The SHA-256 of every file that enters
the cache is recorded (cache.SHA256SUMS). A temporary file left by a downloader that was killed is
removed the next time its cache entry is fetched.

Every command retries the same way: a download or an existence check (HEAD) that cannot connect,
or gets HTTP 5xx or 429, is tried LMHP_RETRIES more times, after pauses of 1-2 s, 2-4 s, 4-8 s, ...
One that still cannot connect is an `Offline` error naming the ways to go on without the network.

Environment:
    LMHP_CACHE_DIR         cache folder (default ~/.cache/lm_human_preferences)
    LMHP_MIRROR            what stands in for https://openaipublic.blob.core.windows.net: a mirror's
                           base URL (or a local test server), or a local folder in the URL layout
                           (DIR/gpt-2/models/124M/hparams.json; a copied cache's host folder, or a
                           copied cache itself, works too). A folder's own SHA256SUMS, if it has one,
                           is checked as files are copied from it.
    LMHP_RETRIES           retries after a failed attempt (default 3)
    LMHP_LOCK_TIMEOUT      seconds to wait for another process's download (default 3600)
    LMHP_DOWNLOAD_TIMEOUT  seconds a download may go without receiving data, retries and the
                           pauses between them included, before it gives up (default 600);
                           one silent read ends an attempt after a twentieth of it
"""

import errno
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from http.client import HTTPException
from pathlib import Path
from typing import TypeVar

from lm_human_preferences.utils import cache, download
from lm_human_preferences.utils.download import Entry
from lm_human_preferences.utils.errors import UserError

PUBLIC_BASE = "https://openaipublic.blob.core.windows.net"
_GS_BUCKETS = ("gpt-2", "lm-human-preferences")

T = TypeVar("T")


def is_remote(path: str) -> bool:
    return path.startswith(("gs://", "https://", "http://"))


def canonical_url(path: str) -> str:
    """Map gs:// paths of the original's buckets to their public HTTPS home."""
    if path.startswith("gs://"):
        bucket, _, rest = path[len("gs://"):].partition("/")
        if bucket not in _GS_BUCKETS:
            raise UserError(
                f"{path}: only gs://gpt-2/ and gs://lm-human-preferences/ are known; "
                "download the file yourself and pass a local path or an https:// URL")
        return f"{PUBLIC_BASE}/{bucket}/{rest}"
    return path


def gs_path(url: str) -> str:
    """The original's gs:// name of a canonical URL of its buckets; other URLs as they are."""
    return "gs://" + url[len(PUBLIC_BASE) + 1:] if _is_public(url) else url


def _is_public(url: str) -> bool:
    """Whether a canonical URL is one of the original's files (which LMHP_MIRROR stands in for)."""
    return url.startswith(PUBLIC_BASE + "/")


def join(base: str, *parts: str) -> str:
    """Join path components for both URLs and local paths."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def _entry(url: str) -> Entry:
    """The entry of a canonical URL: read from LMHP_MIRROR where it stands in for the public store."""
    mirror = os.environ.get("LMHP_MIRROR")
    target = cache.cache_path(url)
    if not mirror or not _is_public(url):
        return Entry(url, url, target)
    if is_remote(mirror):
        return Entry(url, mirror.rstrip("/") + url[len(PUBLIC_BASE):], target)
    root = Path(mirror.removeprefix("file://")).expanduser()
    host = urllib.parse.urlsplit(PUBLIC_BASE).netloc
    base = root / host if (root / host).is_dir() else root  # a copied cache holds the host's folder
    return Entry(url, str(base / cache.url_path(url)), target, mirror_root=root)


class Offline(UserError):
    """A file neither in the cache nor reachable; its message names every way to go on offline.

    `fetch_target` is what the message tells `fetch` to get: the model or file by default; a
    command line that knows its experiment names that instead.
    """

    def __init__(self, entry: Entry, attempts: int, reason: str):
        self.url = entry.url
        self.head = (f"{entry.contacted}: cannot connect after {attempts} attempt{'s' * (attempts > 1)} "
                     f"({reason}){entry.mirror_note()}; cache file {entry.target}")
        self.fetch_target = _fetch_name(entry.url)
        super().__init__(self.head)

    def __str__(self) -> str:
        target = self.fetch_target
        fetch_and_copy = (f"run `./launch.py fetch {target}` where there is one and copy its cache folder to "
                          f"{cache.cache_dir()} (LMHP_CACHE_DIR)")
        if not _is_public(self.url):
            return f"{self.head}; to work without the network, {fetch_and_copy}, or give a local copy in its place"
        return (f"{self.head}; to work without the network, {fetch_and_copy}, or copy the files in their URL layout "
                f"(DIR/gpt-2/..., DIR/lm-human-preferences/...) here and run `./launch.py fetch {target} --from DIR` "
                f"or set LMHP_MIRROR=DIR (or a mirror's URL){_local_copy_hint(self.url)}")


_MODELS_PREFIX = f"{PUBLIC_BASE}/gpt-2/models/"


def _fetch_name(url: str) -> str:
    """What `fetch` takes to get `url`: a GPT-2 model's name, else the file's gs:// or URL."""
    if url.startswith(_MODELS_PREFIX):
        return url[len(_MODELS_PREFIX):].split("/", 1)[0]
    return gs_path(url)


def _local_copy_hint(url: str) -> str:
    if url.startswith(_MODELS_PREFIX):
        return ("; or give a local model folder as --task.policy.initial_model (a save folder's policy/, or a "
                "Hugging Face GPT-2 folder)")
    if url.startswith(f"{PUBLIC_BASE}/lm-human-preferences/labels/"):
        return "; or give a local copy of the label file as --labels.source"
    if url.startswith(f"{PUBLIC_BASE}/gpt-2/encodings/"):
        return ""  # an encoding is named, not given by path: its files must be in the cache
    return f"; or give a local copy in place of {gs_path(url)}"


def exists(path: str) -> bool:
    """Whether a local path or remote file exists: in the cache, recorded as absent (NOT_FOUND), or
    asked of the server (HEAD, retried as downloads are)."""
    if not is_remote(path):
        return Path(path).expanduser().exists()
    url = canonical_url(path)
    target = cache.cache_path(url)
    if target.is_file() or cache.migrate_legacy(url, target):
        return True
    entry = _entry(url)
    if entry.mirror_root is None and cache.is_not_found(url):  # a mirror folder is looked into: a file copied
        return False                                          # there since its absence was recorded counts
    found = _retrying(entry, lambda patience: download.probe(entry, patience.read_timeout), download.retry_count(),
                      download.BACKOFF_S)
    if not found and _is_public(url):
        cache.record_not_found(url)  # the buckets are archived: what they lack stays lacking
    return found


def where(path: str) -> tuple[str, int | None]:
    """Where a remote file would be read from, and its size where known (for listings: one HEAD
    request at most, not retried, and no download)."""
    url = canonical_url(path)
    target = cache.cache_path(url)
    if target.is_file() or cache.migrate_legacy(url, target):
        return "in the cache", target.stat().st_size
    entry = _entry(url)
    if entry.mirror_root is not None:
        source = Path(entry.contacted)
        return (f"in {entry.mirror_root}", source.stat().st_size) if source.is_file() else (
            f"not in {entry.mirror_root}", None)
    if cache.is_not_found(url):
        return f"not found (listed in {cache.cache_dir() / cache.NOT_FOUND})", None
    try:
        request = urllib.request.Request(entry.contacted, method="HEAD")
        with urllib.request.urlopen(request, timeout=download.Patience().read_timeout) as response:
            return "to download", download.content_length(response)
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code} {e.reason}", None
    except (urllib.error.URLError, OSError, HTTPException) as e:
        return f"cannot connect ({download.reason(e)})", None


def fetch(path: str, retries: int | None = None, backoff: float = download.BACKOFF_S) -> Path:
    """A local path to the file at `path` (local path, https:// or gs:// URL).

    Remote files are downloaded into the cache on first use; later calls (from any process)
    reuse the cached copy. `retries` defaults to LMHP_RETRIES.
    """
    if not is_remote(path):
        local = Path(path).expanduser()
        if not local.is_file():
            raise UserError(f"{path}: no such file")
        return local
    url = canonical_url(path)
    entry = _entry(url)
    if entry.target.is_file():
        return entry.target
    try:
        entry.target.parent.mkdir(parents=True, exist_ok=True)
        with download.locked(entry):
            # another process may have finished it while we waited, or an earlier version cached it
            if not entry.target.exists() and not cache.migrate_legacy(url, entry.target):
                _retrying(entry, lambda patience: download.attempt(entry, patience),
                          download.retry_count() if retries is None else retries, backoff)
    except OSError as e:
        raise _os_error(e, entry) from None
    return entry.target


def _retrying(entry: Entry, attempt: Callable[[download.Patience], T], retries: int, backoff: float) -> T:
    """download.with_retries, an unreachable source reported as Offline."""
    try:
        return download.with_retries(entry, attempt, retries, backoff)
    except download.Unreachable as e:
        raise Offline(entry, e.attempts, e.why) from None


def _os_error(e: OSError, entry: Entry) -> UserError:
    if e.errno == errno.ENOSPC:
        return entry.error("disk full while saving the download", "free space or set LMHP_CACHE_DIR to another disk")
    return entry.error(f"cannot write into the cache ({e.strerror})", "set LMHP_CACHE_DIR to a writable folder")


SYNC_BYTES = 4 << 20  # a file written in parts goes to disk in steps of this many bytes (see atomic_write_parts)


def atomic_write_parts(path: Path, parts: Iterable[bytes], durable: bool = True,
                       when_full: str = "free space and run again") -> None:
    """Write the byte strings `parts` to `path` so that readers see either the old file or the whole new one.

    The data goes to disk every SYNC_BYTES as it is written: a file system that orders data before
    metadata (ext4) would otherwise make the next fsync of another file on it (the labeling app's
    database) wait for the whole file, and stall whoever waits on that. `durable`: the file's
    metadata is fsynced too, not only its data (fdatasync). `when_full`: the advice of the error a
    full disk gives."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "wb") as out:
            unsynced = 0
            for part in parts:
                if unsynced >= SYNC_BYTES:
                    out.flush()
                    os.fdatasync(out.fileno())
                    unsynced = 0
                out.write(part)
                unsynced += len(part)
            out.flush()
            (os.fsync if durable else os.fdatasync)(out.fileno())
        os.replace(partial, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"disk full while writing {path}; {when_full}") from None
        raise UserError(f"cannot write {path} ({e.strerror})") from None
    finally:
        partial.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see either the old file or the whole new one."""
    atomic_write_parts(path, [data])


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
