"""Where files come from: local paths, https:// URLs and the original's gs:// buckets.

The original read everything from `gs://gpt-2/...` and `gs://lm-human-preferences/...`.
Those buckets are gone; the same files are served over HTTPS from OpenAI's public blob
store, so gs:// paths are mapped there. Remote files are downloaded once into a cache
folder (keyed by URL) and reused. Downloads are atomic (temporary name + rename) and
guarded by a file lock, so concurrent processes on one machine wait for a single
downloader and never see a half-written file.

Environment:
    LMHP_CACHE_DIR     cache folder (default ~/.cache/lm_human_preferences)
    LMHP_MIRROR        base URL that replaces https://openaipublic.blob.core.windows.net
                       (a mirror, or a local test server)
    LMHP_LOCK_TIMEOUT  seconds to wait for another process's download (default 3600)
"""

import errno
import fcntl
import hashlib
import os
import random
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException
from pathlib import Path

from tqdm import tqdm

from lm_human_preferences.utils.errors import UserError

PUBLIC_BASE = "https://openaipublic.blob.core.windows.net"
_GS_BUCKETS = ("gpt-2", "lm-human-preferences")
_CHUNK = 1 << 20


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


def join(base: str, *parts: str) -> str:
    """Join path components for both URLs and local paths."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def _fetch_url(url: str) -> str:
    """The URL actually contacted: the canonical one, redirected to LMHP_MIRROR if set."""
    mirror = os.environ.get("LMHP_MIRROR")
    if mirror and url.startswith(PUBLIC_BASE + "/"):
        return mirror.rstrip("/") + url[len(PUBLIC_BASE):]
    return url


def cache_dir() -> Path:
    return Path(os.environ.get("LMHP_CACHE_DIR") or Path.home() / ".cache" / "lm_human_preferences")


def cache_path(url: str) -> Path:
    """Cache location of a canonical URL: readable host/path, plus a hash for odd characters."""
    parsed = urllib.parse.urlsplit(url)
    safe_parts = [p for p in parsed.path.split("/") if p and p not in (".", "..")]
    if not safe_parts:
        raise UserError(f"{url}: the URL names no file")
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return cache_dir().joinpath(parsed.netloc, *safe_parts[:-1], f"{digest}-{safe_parts[-1]}")


def exists(path: str) -> bool:
    """Whether a local path or remote file exists (HEAD request, no download, no cache)."""
    if not is_remote(path):
        return Path(path).expanduser().exists()
    url = canonical_url(path)
    if cache_path(url).exists():
        return True
    request = urllib.request.Request(_fetch_url(url), method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=60):
            return True
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        raise UserError(f"{url}: HTTP {e.code} {e.reason}; check the URL or try again later") from None
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"{url}: cannot connect ({_reason(e)}); check your network or use a local copy") from None


def fetch(path: str, retries: int = 5, backoff: float = 1.0) -> Path:
    """A local path to the file at `path` (local path, https:// or gs:// URL).

    Remote files are downloaded into the cache on first use; later calls (from any process)
    reuse the cached copy.
    """
    if not is_remote(path):
        local = Path(path).expanduser()
        if not local.is_file():
            raise UserError(f"{path}: no such file")
        return local
    url = canonical_url(path)
    target = cache_path(url)
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _lock(target.with_name(target.name + ".lock"), url):
            if not target.exists():  # another process may have finished it while we waited
                _download_with_retries(url, target, retries, backoff)
    except OSError as e:
        raise _os_error(e, url, target) from None
    return target


def _os_error(e: OSError, url: str, target: Path) -> UserError:
    if e.errno == errno.ENOSPC:
        return UserError(f"disk full while saving {url} to {target.parent}; free space or set LMHP_CACHE_DIR")
    return UserError(f"cannot write {url} into the cache at {target.parent} ({e.strerror}); "
                     "set LMHP_CACHE_DIR to a writable folder")


class _lock:
    """An exclusive flock on `path`, polled until LMHP_LOCK_TIMEOUT seconds have passed."""

    def __init__(self, path: Path, url: str):
        self.path, self.url = path, url

    def __enter__(self):
        timeout = float(os.environ.get("LMHP_LOCK_TIMEOUT", "3600"))
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise UserError(
                        f"waited {timeout:.0f} s for another process downloading {self.url} "
                        f"(lock {self.path}); raise LMHP_LOCK_TIMEOUT or stop the other process") from None
                time.sleep(0.2)

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class _Retryable(Exception):
    pass


def _reason(e: BaseException) -> str:
    return str(getattr(e, "reason", None) or e) or type(e).__name__


def _download_with_retries(url: str, target: Path, retries: int, backoff: float) -> None:
    for attempt in range(retries + 1):
        try:
            _download(url, target)
            return
        except _Retryable as e:
            if attempt == retries:
                raise UserError(f"{url}: download failed after {retries + 1} attempts ({e}); "
                                "check your network or try again later") from None
            delay = backoff * 2 ** attempt * (1 + random.random())
            print(f"{url}: {e}; retrying in {delay:.1f} s", file=sys.stderr)
            time.sleep(delay)


def _download(url: str, target: Path) -> None:
    """One attempt: stream into a temporary file beside `target`, then rename into place."""
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        try:
            response = urllib.request.urlopen(_fetch_url(url), timeout=60)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise UserError(f"{url}: not found (HTTP 404); check the path") from None
            if e.code >= 500 or e.code == 429:
                raise _Retryable(f"HTTP {e.code} {e.reason}") from None
            raise UserError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, HTTPException) as e:
            raise _Retryable(f"cannot connect: {_reason(e)}") from None
        with response, open(partial, "wb") as out:
            expected = response.headers.get("Content-Length")
            expected = int(expected) if expected is not None else None
            received = 0
            with tqdm(total=expected, unit="B", unit_scale=True, desc=target.name.split("-", 1)[-1],
                      disable=expected is None or expected < 10 * _CHUNK, file=sys.stderr) as bar:
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except (OSError, HTTPException) as e:
                        raise _Retryable(f"connection lost after {received} bytes: {_reason(e)}") from None
                    if not chunk:
                        break
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if expected is not None and received != expected:
                raise _Retryable(f"connection closed after {received} of {expected} bytes")
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UserError(f"disk full while writing {path}; free space and run again") from None
        raise UserError(f"cannot write {path} ({e.strerror})") from None
    finally:
        partial.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
