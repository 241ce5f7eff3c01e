"""Where files come from: local paths, https:// URLs and the original's gs:// buckets.

The original read everything from `gs://gpt-2/...` and `gs://lm-human-preferences/...`.
Those buckets are gone; the same files are served over HTTPS from OpenAI's public blob
store, so gs:// paths are mapped there. Remote files are downloaded once into a cache
folder (keyed by URL) and reused. Downloads are atomic (temporary name + rename) and
guarded by a file lock, so concurrent processes on one machine wait for a single
downloader and never see a half-written file.

Only complete files enter the cache: a body shorter than its Content-Length is retried,
and a body sent without Content-Length must pass its format's own completeness check
(.json, .gz, .safetensors, TensorFlow .index). A temporary file left by a downloader that
was killed is removed the next time its cache entry is fetched.

Environment:
    LMHP_CACHE_DIR         cache folder (default ~/.cache/lm_human_preferences)
    LMHP_MIRROR            base URL that replaces https://openaipublic.blob.core.windows.net
                           (a mirror, or a local test server)
    LMHP_LOCK_TIMEOUT      seconds to wait for another process's download (default 3600)
    LMHP_DOWNLOAD_TIMEOUT  seconds a download may go without receiving data, retries and the
                           pauses between them included, before it gives up (default 600);
                           one silent read ends an attempt after a twentieth of it
"""

import errno
import fcntl
import gzip
import hashlib
import json
import math
import os
import random
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.client import HTTPException, HTTPResponse
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from lm_human_preferences.utils.errors import UserError

PUBLIC_BASE = "https://openaipublic.blob.core.windows.net"
_GS_BUCKETS = ("gpt-2", "lm-human-preferences")
_CHUNK = 1 << 20
_DEFAULT_DOWNLOAD_TIMEOUT = "600"
_READS_PER_DOWNLOAD_TIMEOUT = 20
# The last 8 bytes of a TensorFlow table (.index) file. Same value as
# language.tf_checkpoint.TABLE_MAGIC, repeated because utils never imports from the rest of
# the package (the language modules import utils).
_TF_TABLE_MAGIC = 0xDB4775248B80FB57


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


def _mirror_note(url: str, contacted: str) -> str:
    """For messages that name the contacted URL: which canonical URL a mirror stood in for."""
    return "" if contacted == url else f"; mirror (LMHP_MIRROR) of {url}"


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


def _download_timeout() -> float:
    value = os.environ.get("LMHP_DOWNLOAD_TIMEOUT", _DEFAULT_DOWNLOAD_TIMEOUT)
    try:
        seconds = float(value)
        if math.isfinite(seconds) and seconds > 0:
            return seconds
    except ValueError:
        pass
    raise UserError(f"LMHP_DOWNLOAD_TIMEOUT={value!r} is not a positive number of seconds; fix or unset it")


def exists(path: str) -> bool:
    """Whether a local path or remote file exists (HEAD request, no download, no cache)."""
    if not is_remote(path):
        return Path(path).expanduser().exists()
    url = canonical_url(path)
    if cache_path(url).exists():
        return True
    contacted = _fetch_url(url)
    request = urllib.request.Request(contacted, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=_Patience().read_timeout):
            return True
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        raise UserError(f"{contacted}: HTTP {e.code} {e.reason}{_mirror_note(url, contacted)}; "
                        "check the URL or try again later") from None
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"{contacted}: cannot connect ({_reason(e)}){_mirror_note(url, contacted)}; "
                        "check your network or use a local copy") from None


@dataclass(frozen=True)
class _Entry:
    """A remote file being fetched: its canonical URL, the URL contacted and its cache file."""

    url: str
    contacted: str
    target: Path

    def error(self, problem: str, advice: str) -> UserError:
        """A one-line error naming the URL contacted and the cache file, and what to do."""
        note = _mirror_note(self.url, self.contacted)
        return UserError(f"{self.contacted}: {problem}{note}; cache file {self.target}; {advice}")


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
    entry = _Entry(url, _fetch_url(url), cache_path(url))
    if entry.target.exists():
        return entry.target
    try:
        entry.target.parent.mkdir(parents=True, exist_ok=True)
        with _lock(entry) as lock_fd:
            _take_over(lock_fd, entry.target)
            if not entry.target.exists():  # another process may have finished it while we waited
                _download_with_retries(entry, retries, backoff)
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
    pass


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


def _download_with_retries(entry: _Entry, retries: int, backoff: float) -> None:
    patience = _Patience()
    for attempt in range(retries + 1):
        try:
            _download(entry, patience)
            return
        except _Retryable as e:
            if attempt == retries:
                raise entry.error(f"download failed after {retries + 1} attempts ({e})",
                                  "check your network or try again later") from None
            delay = backoff * 2 ** attempt * (1 + random.random())
            if delay >= patience.left():
                raise entry.error(
                    f"no data within LMHP_DOWNLOAD_TIMEOUT={patience.total:g} s ({e})",
                    "check your network, try again later or raise LMHP_DOWNLOAD_TIMEOUT") from None
            print(f"{entry.contacted}: {e}; retrying in {delay:.1f} s", file=sys.stderr)
            time.sleep(delay)


def _download(entry: _Entry, patience: _Patience) -> None:
    """One attempt: stream into a temporary file beside the cache file, then rename into place."""
    partial = _partial_path(entry.target, os.getpid())
    try:
        response = _open(entry, patience.read_timeout)
        with response, open(partial, "wb") as out:
            expected = _content_length(response)
            received = _copy_body(response, out, expected, patience, entry.target.name.split("-", 1)[-1])
            if expected is not None and received != expected:
                raise _Retryable(f"connection closed after {received} of {expected} bytes")
            out.flush()
            os.fsync(out.fileno())
        if expected is None:
            _check_complete(partial, entry.target.suffix)
        os.replace(partial, entry.target)
    finally:
        partial.unlink(missing_ok=True)


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
        raise _Retryable(f"cannot connect: {_reason(e)}") from None


def _content_length(response: HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length", "").strip()
    return int(value) if value.isdigit() else None


def _copy_body(response: HTTPResponse, out: BinaryIO, expected: int | None, patience: _Patience,
               label: str) -> int:
    """Copy the response body into `out`; the number of bytes received."""
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
            received += len(chunk)
            bar.update(len(chunk))


def _json_complete(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
    except ValueError:
        return False
    return True


def _gzip_complete(path: Path) -> bool:
    """Whether the file decompresses to the end (a truncated one lacks the gzip trailer)."""
    try:
        with gzip.open(path) as stream:
            while stream.read(_CHUNK):
                pass
    except (EOFError, OSError, zlib.error):
        return False
    return True


def _safetensors_complete(path: Path) -> bool:
    """Whether the header fits the file and every tensor's data lies within it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return False
        (header_size,) = struct.unpack("<Q", prefix)
        if 8 + header_size > size:
            return False
        try:
            header = json.loads(f.read(header_size))
        except ValueError:
            return False
    data_size = size - 8 - header_size
    if not isinstance(header, dict):
        return False
    tensors = [info for name, info in header.items() if name != "__metadata__"]
    return all(_offsets_within(info, data_size) for info in tensors)


def _offsets_within(info: object, data_size: int) -> bool:
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    return (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size)


def _tf_index_complete(path: Path) -> bool:
    """Whether the file ends with a table footer's magic number."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) < 48:  # shorter than a table footer
            return False
        f.seek(-8, os.SEEK_END)
        return struct.unpack("<Q", f.read(8))[0] == _TF_TABLE_MAGIC


# How to tell that a body sent without Content-Length arrived whole, by file suffix; other
# types have no such check and are accepted as they come.
_COMPLETENESS_CHECKS: dict[str, Callable[[Path], bool]] = {
    ".json": _json_complete,
    ".gz": _gzip_complete,
    ".safetensors": _safetensors_complete,
    ".index": _tf_index_complete,
}


def _check_complete(partial: Path, suffix: str) -> None:
    check = _COMPLETENESS_CHECKS.get(suffix)
    if check is not None and not check(partial):
        raise _Retryable(f"the body came without Content-Length and is not a complete {suffix} file")


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
