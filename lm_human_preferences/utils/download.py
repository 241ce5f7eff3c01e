"""One remote file into the cache: the retry policy, the lock, each attempt and its checks.

utils/storage.py decides what to read and from where; this module moves the bytes.
"""

import base64
import fcntl
import hashlib
import math
import os
import random
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPException, HTTPResponse
from pathlib import Path
from typing import BinaryIO, TypeVar

from tqdm import tqdm

from lm_human_preferences.utils import cache, completeness
from lm_human_preferences.utils.errors import UserError

_CHUNK = 1 << 20
_DEFAULT_DOWNLOAD_TIMEOUT = "600"
_DEFAULT_RETRIES = "3"
BACKOFF_S = 1.0
_READS_PER_DOWNLOAD_TIMEOUT = 20

T = TypeVar("T")


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


def download_timeout() -> float:
    return _env_number("LMHP_DOWNLOAD_TIMEOUT", _DEFAULT_DOWNLOAD_TIMEOUT, float, lambda s: s > 0,
                       "a positive number of seconds")


@dataclass(frozen=True)
class Entry:
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


def probe(entry: Entry, timeout: float) -> bool:
    """One existence check: whether the file is there (HEAD, or a look into a mirror folder)."""
    if entry.mirror_root is not None:
        return Path(entry.contacted).is_file()
    try:
        with urllib.request.urlopen(urllib.request.Request(entry.contacted, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        if e.code >= 500 or e.code == 429:
            raise Retryable(f"HTTP {e.code} {e.reason}") from None
        raise entry.error(f"HTTP {e.code} {e.reason}", "check the URL and that it is public") from None
    except (urllib.error.URLError, OSError, HTTPException) as e:
        raise Retryable(f"cannot connect: {reason(e)}", connect=True) from None


@contextmanager
def locked(entry: Entry) -> Iterator[None]:
    """Hold the entry's download lock, as its recorded downloader (see _take_over)."""
    with _lock(entry) as lock_fd:
        _take_over(lock_fd, entry.target)
        yield


class _lock:
    """An exclusive flock on the entry's lock file (cache.lock_path), polled for LMHP_LOCK_TIMEOUT seconds.

    Entering gives the lock file's descriptor.
    """

    def __init__(self, entry: Entry):
        self.entry = entry
        self.path = cache.lock_path(entry.target)
        self.path.parent.mkdir(parents=True, exist_ok=True)

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


class Retryable(Exception):
    """An attempt that failed in a way another attempt may not; `connect`: no connection was made."""

    def __init__(self, message: str, connect: bool = False):
        super().__init__(message)
        self.connect = connect


class Unreachable(Exception):
    """Every attempt failed, the last without a connection."""

    def __init__(self, attempts: int, why: str):
        super().__init__(why)
        self.attempts = attempts
        self.why = why


def reason(e: BaseException) -> str:
    return str(getattr(e, "reason", None) or e) or type(e).__name__


class Patience:
    """How long a download may still wait for data (LMHP_DOWNLOAD_TIMEOUT).

    The allowance runs from the last byte received, across attempts and the pauses between
    them: a silent server is given up on, while a large file arriving slowly is never cut off.
    One read waits a fraction of it, so a stall ends an attempt early enough to leave time for
    retries.
    """

    def __init__(self):
        self.total = download_timeout()
        self.read_timeout = self.total / _READS_PER_DOWNLOAD_TIMEOUT
        self.renew()

    def renew(self) -> None:
        self.last_data = time.monotonic()

    def left(self) -> float:
        return self.total - (time.monotonic() - self.last_data)


def with_retries(entry: Entry, attempt: Callable[[Patience], T], retries: int, backoff: float) -> T:
    """`attempt(patience)`, tried again after a Retryable failure up to `retries` times, each pause
    about twice the one before (jittered), within LMHP_DOWNLOAD_TIMEOUT of silence."""
    patience = Patience()
    for n in range(retries + 1):
        try:
            return attempt(patience)
        except Retryable as e:
            if n == retries:
                if e.connect:
                    raise Unreachable(retries + 1, reason(e).removeprefix("cannot connect: ")) from None
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


class _Digests:
    """A body's SHA-256 (recorded in the cache) and MD5 (checked against a Content-MD5), as it arrives."""

    def __init__(self):
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5()

    def update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        self.md5.update(chunk)


def attempt(entry: Entry, patience: Patience) -> None:
    """One attempt: stream into a temporary file beside the cache file, check it, rename it into place."""
    partial = _partial_path(entry.target, os.getpid())
    digests = _Digests()
    try:
        if entry.mirror_root is not None:
            _copy_from_mirror_folder(entry, partial, patience, digests)
        else:
            _download_url(entry, partial, patience, digests)
        os.replace(partial, entry.target)
    finally:
        partial.unlink(missing_ok=True)
    cache.record_sha256(entry.target, digests.sha256.hexdigest())


def _download_url(entry: Entry, partial: Path, patience: Patience, digests: _Digests) -> None:
    response = _open(entry, patience.read_timeout)
    with response, open(partial, "wb") as out:
        expected = content_length(response)
        received = _copy_body(response, out, expected, patience, entry.target.name, digests)
        if expected is not None and received != expected:
            raise Retryable(f"connection closed after {received} of {expected} bytes")
        content_md5 = response.headers.get("Content-MD5", "").strip()
        if content_md5 and content_md5 != base64.b64encode(digests.md5.digest()).decode("ascii"):
            raise Retryable("the body does not match its Content-MD5 header")
        out.flush()
        os.fsync(out.fileno())
    if expected is None and not completeness.is_complete(partial, entry.target.suffix):
        raise Retryable(f"the body came without Content-Length and is not a complete {entry.target.suffix} file")


def _copy_from_mirror_folder(entry: Entry, partial: Path, patience: Patience, digests: _Digests) -> None:
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


def _open(entry: Entry, timeout: float) -> HTTPResponse:
    try:
        return urllib.request.urlopen(entry.contacted, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise entry.error("not found (HTTP 404)", "check the path (and LMHP_MIRROR, if set)") from None
        if e.code >= 500 or e.code == 429:
            raise Retryable(f"HTTP {e.code} {e.reason}") from None
        raise entry.error(f"HTTP {e.code} {e.reason}", "check the URL and that it is public") from None
    except (urllib.error.URLError, OSError, HTTPException) as e:
        raise Retryable(f"cannot connect: {reason(e)}", connect=True) from None


def content_length(response: HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length", "").strip()
    return int(value) if value.isdigit() else None


def _copy_body(response: BinaryIO, out: BinaryIO, expected: int | None, patience: Patience, label: str,
               digests: _Digests) -> int:
    """Copy the response body into `out`, digesting it; the number of bytes received."""
    received = 0
    with tqdm(total=expected, unit="B", unit_scale=True, desc=label,
              disable=expected is None or expected < 10 * _CHUNK, file=sys.stderr) as bar:
        while True:
            try:
                chunk = response.read(_CHUNK)
            except TimeoutError:
                raise Retryable(f"no data for {patience.read_timeout:g} s after {received} bytes") from None
            except (OSError, HTTPException) as e:
                raise Retryable(f"connection lost after {received} bytes: {reason(e)}") from None
            if not chunk:
                return received
            patience.renew()
            out.write(chunk)
            digests.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))

