"""``quickdraw download`` against a local HTTP server on port 0 that mirrors Google's bucket from the sample data.

The server speaks enough HTTP/1.1 for the downloader (HEAD, GET, single ``Range``) and can misbehave on
purpose: cut a response short, ignore ranges, or always send too few bytes. No test touches the internet.
"""

from __future__ import annotations

import http.server
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from quickdraw.cli import main
from trainer.categories import CATEGORIES
from trainer.download import DownloadError, download, download_file, file_url, resolve_classes


@dataclass
class Behaviour:
    """How the mirror misbehaves, and what it saw."""

    cut_first_get_at: int | None = None  # close the first GET of each file after this many bytes
    ignore_range: bool = False
    always_short_by: int = 0  # advertise the full length but send this many bytes fewer, every time
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)
    body_bytes: int = 0
    _cut_done: set[str] = field(default_factory=set)


def make_handler(root: Path, behaviour: Behaviour) -> type[http.server.BaseHTTPRequestHandler]:
    """A handler that maps ``/full/<format>/<file>`` to ``root/<format>/<file>``."""

    class Mirror(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _file(self) -> Path | None:
            parts = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).strip("/").split("/")
            if len(parts) != 3 or parts[0] != "full":
                return None
            path = root / parts[1] / parts[2]
            return path if path.is_file() else None

        def _head(self, status: int, length: int, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()

        def do_HEAD(self) -> None:
            behaviour.requests.append(("HEAD", self.path, None))
            path = self._file()
            if path is None:
                self.send_error(404)
                return
            self._head(200, path.stat().st_size)

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            behaviour.requests.append(("GET", self.path, rng))
            path = self._file()
            if path is None:
                self.send_error(404)
                return
            data = path.read_bytes()
            size = len(data)
            start = 0
            if rng and not behaviour.ignore_range:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= size:
                    self._head(416, 0, {"Content-Range": f"bytes */{size}"})
                    return
                self._head(206, size - start, {"Content-Range": f"bytes {start}-{size - 1}/{size}"})
            else:
                self._head(200, size)
            body = data[start:]
            if behaviour.always_short_by:
                body = body[: max(0, len(body) - behaviour.always_short_by)]
            if behaviour.cut_first_get_at is not None and self.path not in behaviour._cut_done:
                behaviour._cut_done.add(self.path)
                body = body[: behaviour.cut_first_get_at]
            self.wfile.write(body)
            behaviour.body_bytes += len(body)
            if len(body) < size - start:
                self.close_connection = True

    return Mirror


@pytest.fixture()
def mirror(sample: Path) -> Iterator[tuple[str, Behaviour]]:
    """(base URL, behaviour) of a mirror of the sample data on a free port."""
    behaviour = Behaviour()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(sample, behaviour))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", behaviour
    finally:
        server.shutdown()
        server.server_close()


def test_categories_are_googles_345() -> None:
    assert len(CATEGORIES) == len(set(CATEGORIES)) == 345
    assert {"alarm clock", "The Eiffel Tower", "zigzag", "cat"} <= set(CATEGORIES)
    assert resolve_classes(["CAT", " alarm clock ", "cat"]) == ["cat", "alarm clock"]


def test_unknown_class_names_the_field_and_suggests() -> None:
    with pytest.raises(Exception, match=r"--classes: 'alarmclock' is not one of the 345.*'alarm clock'"):
        resolve_classes(["alarmclock"])


def test_url_encodes_spaces() -> None:
    url = file_url("https://storage.googleapis.com/quickdraw_dataset/", "numpy_bitmap", "alarm clock")
    assert url == "https://storage.googleapis.com/quickdraw_dataset/full/numpy_bitmap/alarm%20clock.npy"
    assert file_url("http://x", "binary", "cat") == "http://x/full/binary/cat.bin"


def test_downloads_are_byte_identical_and_skipped_when_complete(
    mirror: tuple[str, Behaviour], sample: Path, tmp_path: Path
) -> None:
    base, behaviour = mirror
    results = download(["cat", "alarm clock"], "numpy_bitmap", tmp_path, base_url=base, progress=False)
    assert [r.status for r in results] == ["downloaded", "downloaded"]
    for name in ("cat", "alarm clock"):
        got = tmp_path / "numpy_bitmap" / f"{name}.npy"
        assert got.read_bytes() == (sample / "numpy_bitmap" / f"{name}.npy").read_bytes()
        assert not got.with_name(got.name + ".part").exists()
    behaviour.requests.clear()
    again = download(["cat", "alarm clock"], "numpy_bitmap", tmp_path, base_url=base, progress=False)
    assert [r.status for r in again] == ["up to date", "up to date"]
    assert [m for m, _, _ in behaviour.requests] == ["HEAD", "HEAD"]  # no body fetched again


def test_resumes_a_partial_file_with_a_range_request(
    mirror: tuple[str, Behaviour], sample: Path, tmp_path: Path
) -> None:
    base, behaviour = mirror
    src = (sample / "numpy_bitmap" / "cat.npy").read_bytes()
    part = tmp_path / "numpy_bitmap" / "cat.npy.part"
    part.parent.mkdir(parents=True)
    half = len(src) // 2
    part.write_bytes(src[:half])
    result = download_file(file_url(base, "numpy_bitmap", "cat"), tmp_path / "numpy_bitmap" / "cat.npy",
                           progress=False)
    assert result.status == "resumed"
    assert result.fetched_bytes == len(src) - half
    assert (tmp_path / "numpy_bitmap" / "cat.npy").read_bytes() == src
    assert ("GET", "/full/numpy_bitmap/cat.npy", f"bytes={half}-") in behaviour.requests


def test_a_dropped_connection_is_resumed(mirror: tuple[str, Behaviour], sample: Path, tmp_path: Path) -> None:
    base, behaviour = mirror
    behaviour.cut_first_get_at = 100_000
    result = download_file(file_url(base, "numpy_bitmap", "alarm clock"), tmp_path / "alarm clock.npy",
                           progress=False, retry_wait_s=0.0)
    src = (sample / "numpy_bitmap" / "alarm clock.npy").read_bytes()
    assert result.status == "resumed"
    assert (tmp_path / "alarm clock.npy").read_bytes() == src
    gets = [r for m, _, r in behaviour.requests if m == "GET"]
    assert gets == [None, "bytes=100000-"]
    assert behaviour.body_bytes == len(src)  # nothing fetched twice


def test_a_server_ignoring_ranges_restarts_cleanly(
    mirror: tuple[str, Behaviour], sample: Path, tmp_path: Path
) -> None:
    base, behaviour = mirror
    behaviour.ignore_range = True
    part = tmp_path / "cat.ndjson.part"
    part.write_bytes(b"garbage that is not a prefix")
    download_file(file_url(base, "simplified", "cat"), tmp_path / "cat.ndjson", progress=False)
    assert (tmp_path / "cat.ndjson").read_bytes() == (sample / "simplified" / "cat.ndjson").read_bytes()


def test_size_mismatch_fails_and_keeps_the_partial_file(mirror: tuple[str, Behaviour], tmp_path: Path) -> None:
    base, behaviour = mirror
    behaviour.always_short_by = 10
    dest = tmp_path / "cat.npy"
    with pytest.raises(DownloadError, match=r"cat\.npy: got \d+ of \d+ bytes after 2 retries"):
        download_file(file_url(base, "numpy_bitmap", "cat"), dest, progress=False, retries=2, retry_wait_s=0.0)
    assert not dest.exists()
    assert (tmp_path / "cat.npy.part").exists()


def test_a_stale_file_of_the_wrong_size_is_replaced(
    mirror: tuple[str, Behaviour], sample: Path, tmp_path: Path
) -> None:
    base, _ = mirror
    dest = tmp_path / "numpy_bitmap" / "cat.npy"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"truncated")
    [result] = download(["cat"], "numpy_bitmap", tmp_path, base_url=base, progress=False)
    assert result.status == "downloaded"
    assert dest.read_bytes() == (sample / "numpy_bitmap" / "cat.npy").read_bytes()


def test_cli_all_simplified_reports_the_missing_file_and_keeps_the_rest(
    mirror: tuple[str, Behaviour], sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, _ = mirror
    code = main(["download", "--all", "--format", "simplified", "--out", str(tmp_path), "--base-url", base,
                 "--no-progress", "--retries", "0"])
    out, err = capsys.readouterr()
    # The sample has 344 of the 345 simplified files; the mirror answers 404 for zigzag.
    assert code == 1
    assert "failed      zigzag.ndjson" in err and "HTTP 404" in err
    assert "344 of 345 files" in out
    assert len(list((tmp_path / "simplified").glob("*.ndjson"))) == 344
    assert (tmp_path / "simplified" / "alarm clock.ndjson").read_bytes() == (
        sample / "simplified" / "alarm clock.ndjson"
    ).read_bytes()


def test_cli_classes_with_spaces_and_progress(
    mirror: tuple[str, Behaviour], sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, _ = mirror
    code = main(["download", "--classes", "Alarm Clock,house plant", "--format", "numpy_bitmap",
                 "--out", str(tmp_path), "--base-url", base])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "2 of 2 files" in out
    assert "alarm clock.npy" in err and "100%" in err  # tqdm's per-file bar went to stderr
    assert (tmp_path / "numpy_bitmap" / "house plant.npy").stat().st_size == (
        sample / "numpy_bitmap" / "house plant.npy"
    ).stat().st_size


def test_cli_rejects_unknown_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["download", "--classes", "cat,dgo", "--out", str(tmp_path), "--base-url", "http://127.0.0.1:9"])
    assert code == 2
    assert "'dgo' is not one of the 345" in capsys.readouterr().err
