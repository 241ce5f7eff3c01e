"""The download cache (LMHP_CACHE_DIR, default ~/.cache/lm_human_preferences), laid out as the URLs are.

    <cache>/openaipublic.blob.core.windows.net/gpt-2/models/124M/hparams.json
    <cache>/openaipublic.blob.core.windows.net/lm-human-preferences/labels/descriptiveness/offline_5k.json
    <cache>/SHA256SUMS   the SHA-256 of every file put in the cache, as `sha256sum` writes it
                         (paths relative to <cache>: `cd <cache> && sha256sum -c SHA256SUMS` checks them)
    <cache>/NOT_FOUND    URLs of the original's buckets that answered "not found" (404), one a line
    <cache>/.locks/      a lock file per entry, held while it downloads (kept out of the tree above)

A cache copied to another machine works there as it is; its host folder is also a mirror in the
URL layout (`fetch --from <cache>/openaipublic.blob.core.windows.net`, or LMHP_MIRROR=<that folder>).
The buckets are archived, so a file they lack stays lacking: NOT_FOUND lets a run without the
network tell "absent" (the books passages, the layouts a model folder is probed for) from "not
downloaded yet". A mirror folder (LMHP_MIRROR, fetch --from) is always looked into again; for the
store itself or a mirror's URL, delete a line of NOT_FOUND to ask again.

Earlier versions named each file `<12 hex digits of sha256(url)>-<name>` in its folder. Such an
entry is moved to its new name the first time it is looked up: it was only ever renamed into
place whole, so it needs no download again (and none is possible offline).
"""

import fcntl
import functools
import hashlib
import os
import urllib.parse
from pathlib import Path

from lm_human_preferences.utils.errors import UserError

SHA256SUMS = "SHA256SUMS"
NOT_FOUND = "NOT_FOUND"


def cache_dir() -> Path:
    return Path(os.environ.get("LMHP_CACHE_DIR") or Path.home() / ".cache" / "lm_human_preferences")


def _host_and_parts(url: str) -> tuple[str, list[str]]:
    """The URL's host (credentials dropped, port kept) and its path's segments, '.' and '..' dropped."""
    parsed = urllib.parse.urlsplit(url)
    parts = [p for p in parsed.path.split("/") if p and p not in (".", "..")]
    if not parts:
        raise UserError(f"{url}: the URL names no file")
    if parsed.query:  # a file name cannot hold every query; its digest keeps entries apart
        parts[-1] += "@" + hashlib.sha256(parsed.query.encode()).hexdigest()[:12]
    return parsed.netloc.rpartition("@")[2], parts


def cache_path(url: str) -> Path:
    """Where the file at `url` is cached: <cache>/<host>/<path>."""
    host, parts = _host_and_parts(url)
    return cache_dir().joinpath(host, *parts)


def lock_path(target: Path) -> Path:
    """The lock file of a cache file, under <cache>/.locks/ in the same layout."""
    return cache_dir() / ".locks" / f"{target.relative_to(cache_dir())}.lock"


def url_path(url: str) -> str:
    """The URL's path as the cache and a mirror folder lay it out (no leading '/')."""
    return "/".join(_host_and_parts(url)[1])


def _legacy_path(url: str) -> Path:
    """The cache file of `url` in the hash layout of earlier versions."""
    parsed = urllib.parse.urlsplit(url)
    parts = [p for p in parsed.path.split("/") if p and p not in (".", "..")]
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return cache_dir().joinpath(parsed.netloc, *parts[:-1], f"{digest}-{parts[-1]}")


def migrate_legacy(url: str, target: Path) -> bool:
    """Move the entry of `url` from the old hash layout to `target`; whether the entry is now there
    (moved by this process or, a moment before, by another)."""
    legacy = _legacy_path(url)
    if not legacy.is_file():
        return target.is_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(legacy, target)
    except FileNotFoundError:
        return target.is_file()
    legacy.with_name(legacy.name + ".lock").unlink(missing_ok=True)
    record_sha256(target, file_sha256(target))
    return True


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _append_line(name: str, line: str) -> None:
    """Append one line to a list file at the cache's root; one write under a lock, so lines of
    concurrent processes never interleave."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / name, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line.encode("utf-8") + b"\n")
    finally:
        os.close(fd)


def record_sha256(target: Path, digest: str) -> None:
    """Note the SHA-256 of a file just put in the cache (a later line for the same file wins)."""
    _append_line(SHA256SUMS, f"{digest}  {target.relative_to(cache_dir()).as_posix()}")


def recorded_sha256(root: Path) -> dict[str, str]:
    """Relative path → SHA-256 from `root`/SHA256SUMS (empty without one); a later line wins.

    Parsed once per version of the file: copying cnndm's stories from a folder asks for each one.
    """
    path = root / SHA256SUMS
    if not path.is_file():
        return {}
    stat = path.stat()
    return _parse_sums(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _parse_sums(path: str, mtime_ns: int, size: int) -> dict[str, str]:
    sums = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        digest, sep, name = line.partition("  ")
        if sep and len(digest) == 64:
            sums[name.removeprefix("*")] = digest
    return sums


def record_not_found(url: str) -> None:
    if not is_not_found(url):
        _append_line(NOT_FOUND, url)


def is_not_found(url: str) -> bool:
    path = cache_dir() / NOT_FOUND
    return path.is_file() and url in path.read_text(encoding="utf-8").splitlines()
