"""Run the real gateway in-process on free ports for tests: its own event loop in a background thread."""

from __future__ import annotations

import asyncio
import os
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from service.app import App, build_backend
from service.backends import Backend
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
#: The model the gateway tests serve: the shipped one unless QUICKDRAW_TEST_MODEL_DIR names another.
SHIPPED_MODEL = Path(os.environ.get("QUICKDRAW_TEST_MODEL_DIR", ROOT / "models" / "quickdraw"))


class RunningGateway:
    """A started ``App`` on 127.0.0.1 ports chosen by the OS; use as a context manager."""

    def __init__(self, backend_factory: Callable[[Settings], Backend] = build_backend, **overrides: Any) -> None:
        values = {"host": "127.0.0.1", "grpc_port": 0, "http_port": 0, "model_dir": SHIPPED_MODEL, **overrides}
        self.settings = Settings(**values)
        self.loop = asyncio.new_event_loop()
        self.app = App(self.settings, backend_factory=backend_factory)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="gateway-loop")
        self.started: asyncio.Future[None] | None = None

    def __enter__(self) -> RunningGateway:
        self._thread.start()
        self.started = asyncio.run_coroutine_threadsafe(self.app.start(), self.loop)  # type: ignore[assignment]
        self.started.result(timeout=120)  # type: ignore[union-attr]
        return self

    def start_async(self) -> RunningGateway:
        """Start without waiting for the model (to watch health while it loads)."""
        self._thread.start()
        self.started = asyncio.run_coroutine_threadsafe(self.app.start(), self.loop)  # type: ignore[assignment]
        return self

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the gateway's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def stop(self) -> None:
        """Stop the app in order and end the loop."""
        if self.loop.is_running():
            self.call(self.app.stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def target(self) -> str:
        """host:port of the gRPC server."""
        return f"127.0.0.1:{self.app.grpc_port}"

    def scrape(self) -> dict[str, float]:
        """Every sample on /metrics, keyed ``name{label="v",...}`` (labels sorted)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.app.http_port}/metrics", timeout=10).read().decode()
        return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format to a flat dict."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out
