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

import base64
import errno
import fcntl
import hashlib
import math
import os
import random
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException, HTTPResponse
from pathlib import Path
from typing import BinaryIO, TypeVar

from tqdm import tqdm

from lm_human_preferences.utils import cache, completeness
from lm_human_preferences.utils.errors import UserError

PUBLIC_BASE = "https://openaipublic.blob.core.windows.net"
_GS_BUCKETS = ("gpt-2", "lm-human-preferences")
_CHUNK = 1 << 20
_DEFAULT_DOWNLOAD_TIMEOUT = "600"
_DEFAULT_RETRIES = "3"
_BACKOFF_S = 1.0
_READS_PER_DOWNLOAD_TIMEOUT = 20

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
    return "gs://" + url[len(PUBLIC_BASE) + 1:] if url.startswith(PUBLIC_BASE + "/") else url


def join(base: str, *parts: str) -> str:
    """Join path components for both URLs and local paths."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def _env_number(name: str, default: str, kind: type, check: Callable[[float], bool], what: str):
    value = os.environ.get(name) or default
    try:
        number = kind(value)
        if math.isfinite(number) and check(number):
            return number
    except ValueError:
        pass
    raise UserError(f"{name}={value!r} is not {what}; fix or unset it")


def retry_count() -> int:
    """How many times a failed download or existence check is tried again (LMHP_RETRIES)."""
    return _env_number("LMHP_RETRIES", _DEFAULT_RETRIES, int, lambda n: n >= 0, "a whole number ≥ 0")


def _download_timeout() -> float:
    return _env_number("LMHP_DOWNLOAD_TIMEOUT", _DEFAULT_DOWNLOAD_TIMEOUT, float, lambda s: s > 0,
                       "a positive number of seconds")


@dataclass(frozen=True)
class _Entry:
    """A remote file: its canonical URL, where it is read from (a URL, or a file of a mirror
    folder under `mirror_root`) and its cache file."""

    url: str
    contacted: str
    target: Path
    mirror_root: Path | None = None

    def error(self, problem: str, advice: str) -> UserError:
        """A one-line error naming the URL contacted and the cache file, and what to do."""
        return UserError(f"{self.contacted}: {problem}{self.mirror_note()}; cache file {self.target}; {advice}")

    def mirror_note(self) -> str:
        """For messages that name the contacted URL: which canonical URL a mirror stood in for."""
        return "" if self.contacted == self.url else f"; mirror (LMHP_MIRROR) of {self.url}"


def _entry(url: str) -> _Entry:
    """The entry of a canonical URL: read from LMHP_MIRROR where it stands in for the public store."""
    mirror = os.environ.get("LMHP_MIRROR")
    target = cache.cache_path(url)
    if not mirror or not url.startswith(PUBLIC_BASE + "/"):
        return _Entry(url, url, target)
    if is_remote(mirror):
        return _Entry(url, mirror.rstrip("/") + url[len(PUBLIC_BASE):], target)
    root = Path(mirror.removeprefix("file://")).expanduser()
    host = urllib.parse.urlsplit(PUBLIC_BASE).netloc
    base = root / host if (root / host).is_dir() else root  # a copied cache holds the host's folder
    return _Entry(url, str(base / cache.url_path(url)), target, mirror_root=root)


class Offline(UserError):
    """A file neither in the cache nor reachable; its message names every way to go on offline.

    `fetch_target` is what the message tells `fetch` to get: the model or file by default; a
    command line that knows its experiment names that instead.
    """

    def __init__(self, entry: _Entry, attempts: int, reason: str):
        self.url = entry.url
        self.head = (f"{entry.contacted}: cannot connect after {attempts} attempt{'s' * (attempts > 1)} "
                     f"({reason}){entry.mirror_note()}; cache file {entry.target}")
        self.fetch_target = _fetch_name(entry.url)
        super().__init__(self.head)

    def __str__(self) -> str:
        target = self.fetch_target
        fetch_and_copy = (f"run `./launch.py fetch {target}` where there is one and copy its cache folder to "
                          f"{cache.cache_dir()} (LMHP_CACHE_DIR)")
        if not self.url.startswith(PUBLIC_BASE + "/"):
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
    if cache.is_not_found(url):
        return False
    entry = _entry(url)
    found = _with_retries(entry, lambda patience: _probe(entry, patience.read_timeout), retry_count(), _BACKOFF_S)
    if not found and url.startswith(PUBLIC_BASE + "/"):
        cache.record_not_found(url)  # the buckets are archived: what they lack stays lacking
    return found


def _probe(entry: _Entry, timeout: float) -> bool:
    if entry.mirror_root is not None:
        return Path(entry.contacted).is_file()
    try:
        with urllib.request.urlopen(urllib.request.Request(entry.contacted, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        if e.code >= 500 or e.code == 429:
            raise _Retryable(f"HTTP {e.code} {e.reason}") from None
        raise entry.error(f"HTTP {e.code} {e.reason}", "check the URL and that it is public") from None
    except (urllib.error.URLError, OSError, HTTPException) as e:
        raise _Retryable(f"cannot connect: {_reason(e)}", connect=True) from None


def fetch(path: str, retries: int | None = None, backoff: float = _BACKOFF_S) -> Path:
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
        with _lock(entry) as lock_fd:
            _take_over(lock_fd, entry.target)
            # another process may have finished it while we waited, or an earlier version cached it
            if not entry.target.exists() and not cache.migrate_legacy(url, entry.target):
                _with_retries(entry, lambda patience: _download(entry, patience),
                              retry_count() if retries is None else retries, backoff)
    except OSError as e:
        raise _os_error(e, entry) from None
    return entry.target


def _os_error(e: OSError, entry: _Entry) -> UserError:
    if e.errno == errno.ENOSPC:
        return entry.error("disk full while saving the download", "free space or set LMHP_CACHE_DIR to another disk")
    return entry.error(f"cannot write into the cache ({e.strerror})", "set LMHP_CACHE_DIR to a writable folder")


class _lock:
    """An exclusive flock on the entry's `.lock` file, polled for LMHP_LOCK_TIMEOUT seconds.

    Entering gives the lock file's descriptor.
    """

    def __init__(self, entry: _Entry):
        self.entry = entry
        self.path = entry.target.with_name(entry.target.name + ".lock")

    def __enter__(self) -> int:
        timeout = float(os.environ.get("LMHP_LOCK_TIMEOUT", "3600"))
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self.fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise self.entry.error(
                        f"waited {timeout:.0f} s for another process downloading it (lock {self.path})",
                        "raise LMHP_LOCK_TIMEOUT or stop the other process") from None
                time.sleep(0.2)

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _partial_path(target: Path, pid: int) -> Path:
    """The temporary file process `pid` downloads `target` into."""
    return target.with_name(f"{target.name}.partial-{pid}")


def _take_over(lock_fd: int, target: Path) -> None:
    """Record this process as the entry's downloader in its (held) lock file.

    The previous downloader's temporary file is removed first if that process is gone (killed
    before it could clean up). Keeping its PID in the lock file finds that file without listing
    the cache folder, which may hold hundreds of thousands of files.
    """
    previous = os.pread(lock_fd, 32, 0).decode("ascii", "replace").strip()
    if previous.isdigit() and not _process_alive(int(previous)):
        _partial_path(target, int(previous)).unlink(missing_ok=True)
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


class _Retryable(Exception):
    """An attempt that failed in a way another attempt may not; `connect`: no connection was made."""

    def __init__(self, message: str, connect: bool = False):
        super().__init__(message)
        self.connect = connect


def _reason(e: BaseException) -> str:
    return str(getattr(e, "reason", None) or e) or type(e).__name__


class _Patience:
    """How long a download may still wait for data (LMHP_DOWNLOAD_TIMEOUT).

    The allowance runs from the last byte received, across attempts and the pauses between
    them: a silent server is given up on, while a large file arriving slowly is never cut off.
    One read waits a fraction of it, so a stall ends an attempt early enough to leave time for
    retries.
    """

    def __init__(self):
        self.total = _download_timeout()
        self.read_timeout = self.total / _READS_PER_DOWNLOAD_TIMEOUT
        self.renew()

    def renew(self) -> None:
        self.last_data = time.monotonic()

    def left(self) -> float:
        return self.total - (time.monotonic() - self.last_data)


def _with_retries(entry: _Entry, attempt: Callable[[_Patience], T], retries: int, backoff: float) -> T:
    """`attempt(patience)`, tried again after a _Retryable failure up to `retries` times, each pause
    about twice the one before (jittered), within LMHP_DOWNLOAD_TIMEOUT of silence."""
    patience = _Patience()
    for n in range(retries + 1):
        try:
            return attempt(patience)
        except _Retryable as e:
            if n == retries:
                if e.connect:
                    raise Offline(entry, retries + 1, _reason(e).removeprefix("cannot connect: ")) from None
                raise entry.error(f"download failed after {retries + 1} attempts ({e})",
                                  "check your network or try again later") from None
            delay = backoff * 2 ** n * (1 + random.random())
            if delay >= patience.left():
                raise entry.error(
                    f"no data within LMHP_DOWNLOAD_TIMEOUT={patience.total:g} s ({e})",
                    "check your network, try again later or raise LMHP_DOWNLOAD_TIMEOUT") from None
            print(f"{entry.contacted}: {e}; retrying in {delay:.1f} s", file=sys.stderr)
            time.sleep(delay)
    raise AssertionError("unreachable")


@dataclass
class _Digests:
    sha256: "hashlib._Hash"
    md5: "hashlib._Hash"


def _download(entry: _Entry, patience: _Patience) -> None:
    """One attempt: stream into a temporary file beside the cache file, check it, rename it into place."""
    partial = _partial_path(entry.target, os.getpid())
    digests = _Digests(hashlib.sha256(), hashlib.md5())
    try:
        if entry.mirror_root is not None:
            _copy_from_mirror_folder(entry, partial, patience, digests)
        else:
            _download_url(entry, partial, patience, digests)
        os.replace(partial, entry.target)
    finally:
        partial.unlink(missing_ok=True)
    cache.record_sha256(entry.target, digests.sha256.hexdigest())


def _download_url(entry: _Entry, partial: Path, patience: _Patience, digests: _Digests) -> None:
    response = _open(entry, patience.read_timeout)
    with response, open(partial, "wb") as out:
        expected = _content_length(response)
        received = _copy_body(response, out, expected, patience, entry.target.name, digests)
        if expected is not None and received != expected:
            raise _Retryable(f"connection closed after {received} of {expected} bytes")
        content_md5 = response.headers.get("Content-MD5", "").strip()
        if content_md5 and content_md5 != base64.b64encode(digests.md5.digest()).decode("ascii"):
            raise _Retryable("the body does not match its Content-MD5 header")
        out.flush()
        os.fsync(out.fileno())
    if expected is None and not completeness.is_complete(partial, entry.target.suffix):
        raise _Retryable(f"the body came without Content-Length and is not a complete {entry.target.suffix} file")


def _copy_from_mirror_folder(entry: _Entry, partial: Path, patience: _Patience, digests: _Digests) -> None:
    """Copy the file from an LMHP_MIRROR folder, checked against the folder's SHA256SUMS if it lists it."""
    source = Path(entry.contacted)
    if not source.is_file():
        raise entry.error(f"not in the mirror folder {entry.mirror_root}",
                          "copy it there in the URL layout (or unset LMHP_MIRROR)")
    with open(source, "rb") as response, open(partial, "wb") as out:
        _copy_body(response, out, source.stat().st_size, patience, entry.target.name, digests)
        out.flush()
        os.fsync(out.fileno())
    listed = cache.recorded_sha256(entry.mirror_root).get(source.relative_to(entry.mirror_root).as_posix())
    if listed is not None and listed != digests.sha256.hexdigest():
        raise entry.error(f"its SHA-256 is {digests.sha256.hexdigest()}, not the {listed} that "
                          f"{entry.mirror_root / cache.SHA256SUMS} lists", "copy the file into the folder again")


def _open(entry: _Entry, timeout: float) -> HTTPResponse:
    try:
        return urllib.request.urlopen(entry.contacted, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise entry.error("not found (HTTP 404)", "check the path (and LMHP_MIRROR, if set)") from None
        if e.code >= 500 or e.code == 429:
            raise _Retryable(f"HTTP {e.code} {e.reason}") from None
        raise entry.error(f"HTTP {e.code} {e.reason}", "check the URL and that it is public") from None
    except (urllib.error.URLError, OSError, HTTPException) as e:
        raise _Retryable(f"cannot connect: {_reason(e)}", connect=True) from None


def _content_length(response: HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length", "").strip()
    return int(value) if value.isdigit() else None


def _copy_body(response: BinaryIO, out: BinaryIO, expected: int | None, patience: _Patience, label: str,
               digests: _Digests) -> int:
    """Copy the response body into `out`, digesting it; the number of bytes received."""
    received = 0
    with tqdm(total=expected, unit="B", unit_scale=True, desc=label,
              disable=expected is None or expected < 10 * _CHUNK, file=sys.stderr) as bar:
        while True:
            try:
                chunk = response.read(_CHUNK)
            except TimeoutError:
                raise _Retryable(f"no data for {patience.read_timeout:g} s after {received} bytes") from None
            except (OSError, HTTPException) as e:
                raise _Retryable(f"connection lost after {received} bytes: {_reason(e)}") from None
            if not chunk:
                return received
            patience.renew()
            out.write(chunk)
            digests.sha256.update(chunk)
            digests.md5.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))


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
