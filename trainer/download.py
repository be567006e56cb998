"""Download Quick, Draw! files from Google's public bucket: resumable, size-checked, one progress bar per file.

Google publishes each class as one file per format under ``gs://quickdraw_dataset`` (served over HTTPS at
``https://storage.googleapis.com/quickdraw_dataset``). The bucket layout, which a mirror must copy:

======================  =====================================
format                  path under the base URL
======================  =====================================
``numpy_bitmap``        ``full/numpy_bitmap/<class>.npy``
``simplified``          ``full/simplified/<class>.ndjson``
``raw``                 ``full/raw/<class>.ndjson``
``binary``              ``full/binary/<class>.bin``
``sketchrnn``           ``sketchrnn/<class>.npz``
======================  =====================================

A file is written to ``<out>/<format>/<class><suffix>.part`` and renamed when its size matches the
server's. An interrupted download resumes from the partial file with an HTTP ``Range`` request; a server
that ignores ranges is handled by starting over. A file already present with the server's size is skipped.
Only the standard library's HTTP client is used, so the data tools install without extra dependencies.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from doodle.errors import DoodleError
from trainer.categories import CATEGORIES, canonical, suggest

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://storage.googleapis.com/quickdraw_dataset"
BASE_URL_ENV = "QUICKDRAW_BASE_URL"

#: format -> (folder under the base URL, file suffix). The local layout uses the format name as folder.
FORMATS: dict[str, tuple[str, str]] = {
    "numpy_bitmap": ("full/numpy_bitmap", ".npy"),
    "simplified": ("full/simplified", ".ndjson"),
    "raw": ("full/raw", ".ndjson"),
    "binary": ("full/binary", ".bin"),
    "sketchrnn": ("sketchrnn", ".npz"),
}

CHUNK_BYTES = 1 << 20


class DownloadError(DoodleError):
    """A file could not be downloaded completely; the message names the URL and what went wrong."""


def base_url_default() -> str:
    """``QUICKDRAW_BASE_URL`` if set, else Google's bucket."""
    return os.environ.get(BASE_URL_ENV, DEFAULT_BASE_URL)


def resolve_classes(names: Iterable[str]) -> list[str]:
    """Canonical spellings for class names (case-insensitive); unknown names raise with suggestions."""
    out: list[str] = []
    for name in names:
        exact = canonical(name)
        if exact is None:
            close = suggest(name)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise DoodleError(f"--classes: {name!r} is not one of the {len(CATEGORIES)} Quick, Draw! classes{hint}")
        if exact not in out:
            out.append(exact)
    return out


def file_url(base_url: str, fmt: str, name: str) -> str:
    """The URL of one class file; spaces and other characters are percent-encoded."""
    folder, suffix = FORMATS[fmt]
    return f"{base_url.rstrip('/')}/{folder}/{urllib.parse.quote(name + suffix)}"


def local_path(out: Path, fmt: str, name: str) -> Path:
    """Where a class file is saved: ``<out>/<format>/<class><suffix>``, Google's file name kept."""
    return out / fmt / f"{name}{FORMATS[fmt][1]}"


@dataclass(frozen=True)
class FileResult:
    """What happened to one file."""

    name: str
    path: Path
    status: str  # "downloaded", "resumed", "up to date" or "failed"
    size_bytes: int
    fetched_bytes: int
    error: str | None = None


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _remote_size(url: str, timeout_s: float) -> int | None:
    """The file's size from a HEAD request, or None if the server does not say."""
    req = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        length = resp.headers.get("Content-Length")
    return int(length) if length is not None else None


def download_file(
    url: str,
    dest: Path,
    *,
    timeout_s: float = 60.0,
    retries: int = 5,
    retry_wait_s: float = 1.0,
    progress: bool = True,
    desc: str | None = None,
) -> FileResult:
    """Download ``url`` to ``dest`` with resume and a size check; raises DownloadError when it cannot."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    name = desc or dest.name
    try:
        total = _remote_size(url, timeout_s)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"{url}: {getattr(exc, 'reason', exc)}") from exc

    if dest.exists():
        if total is not None and dest.stat().st_size == total:
            return FileResult(name, dest, "up to date", total, 0)
        log.info("%s: local size %d differs from the server's %s; downloading again", dest, dest.stat().st_size, total)
    resumed = part.exists() and part.stat().st_size > 0
    fetched = 0
    last_error = ""
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=not progress, leave=True)
    try:
        for attempt in range(retries + 1):
            have = part.stat().st_size if part.exists() else 0
            bar.n = have
            bar.refresh()
            if total is not None and have == total:
                break
            if total is not None and have > total:
                part.unlink()  # longer than the file: not a prefix of it
                have = 0
            req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
            try:
                with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                    if have and resp.status == 206:
                        m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                        if m is None or int(m.group(1)) != have:
                            raise DownloadError(f"{url}: server answered range {have}- with "
                                                f"{resp.headers.get('Content-Range')!r}")
                        if m.group(3) != "*":
                            total = int(m.group(3))
                        mode = "ab"
                    else:
                        # 200: the whole file (the server ignored the range, or there was nothing to resume).
                        length = resp.headers.get("Content-Length")
                        if length is not None:
                            total = int(length)
                        have, mode = 0, "wb"
                        bar.reset(total=total)
                    with part.open(mode) as f:
                        while chunk := resp.read(CHUNK_BYTES):
                            f.write(chunk)
                            fetched += len(chunk)
                            bar.update(len(chunk))
            except urllib.error.HTTPError as exc:
                if exc.code == 416 and total is not None and part.exists() and part.stat().st_size == total:
                    break  # nothing left to fetch
                if exc.code < 500:
                    raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
                last_error = f"HTTP {exc.code} {exc.reason}"
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                last_error = str(getattr(exc, "reason", exc)) or type(exc).__name__
            size = part.stat().st_size if part.exists() else 0
            if total is None or size == total:
                break
            last_error = last_error or f"connection closed at {size} of {total} bytes"
            if attempt < retries:
                log.warning("%s: %s; resuming (attempt %d of %d)", name, last_error, attempt + 1, retries)
                time.sleep(retry_wait_s * (2**attempt))
                resumed = True
                last_error = ""
    finally:
        bar.close()

    size = part.stat().st_size if part.exists() else 0
    if total is not None and size != total:
        raise DownloadError(
            f"{url}: got {size} of {total} bytes after {retries} retries ({last_error}); "
            f"the partial file {part} is kept and the next run resumes it"
        )
    os.replace(part, dest)
    return FileResult(name, dest, "resumed" if resumed else "downloaded", size, fetched)


def download(
    classes: Iterable[str],
    fmt: str,
    out: Path,
    *,
    base_url: str | None = None,
    progress: bool = True,
    retries: int = 5,
    retry_wait_s: float = 1.0,
    on_result: Callable[[FileResult], None] | None = None,
) -> list[FileResult]:
    """Download one file per class; a failure is recorded and the rest still download."""
    if fmt not in FORMATS:
        raise DoodleError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    base = base_url or base_url_default()
    results: list[FileResult] = []
    for name in classes:
        dest = local_path(out, fmt, name)
        try:
            result = download_file(file_url(base, fmt, name), dest, progress=progress, desc=dest.name,
                                   retries=retries, retry_wait_s=retry_wait_s)
        except DownloadError as exc:
            result = FileResult(dest.name, dest, "failed", 0, 0, str(exc))
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
