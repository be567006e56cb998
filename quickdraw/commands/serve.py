"""``quickdraw serve``: run the gRPC gateway. Every setting is an option here and a ``QUICKDRAW_*`` variable.

Before anything slow, it checks what a newcomer gets wrong, each reported in one line (``quickdraw.cli``): a port
in use ("port 50051 is in use: stop the other server or pass --grpc-port"), and a model directory that is not
there. The default ``--model-dir`` (``models/quickdraw``) is looked for in the working directory, then in the
project the package runs from, so ``quickdraw serve`` works from any directory of a checkout. TensorFlow (the
embedded backend) is imported once, without its C++ log lines unless ``--log-level debug`` (``quickdraw.quiet``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quickdraw.extras import require

EXAMPLE = "{quickdraw} classify --target {target} ../shared/quickdraw/simplified/cat.ndjson"

#: The options ``quickdraw serve --help`` shows; ``--help-all`` shows every setting, grouped as in
#: service/settings.py, and docs/reference/configuration.md (generated) describes each. Every option works either way.
COMMON_OPTIONS = (
    "host", "grpc_port", "http_port", "http_api", "backend", "model_dir", "tfserving_target", "tfserving_version_label",
    "max_batch_size", "max_batch_delay_ms", "max_concurrent_batches", "max_queue_wait_ms", "log_level",
    "shutdown_grace_s", "tls_cert_file", "tls_key_file", "tls_client_ca_file", "http_tls", "auth_token_file",
    "tfserving_tls_ca_file", "tfserving_tls_server_name",
)  # fmt: skip


class _HelpAll(argparse.Action):
    """``--help-all``: the help with every option shown, then exit."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        for action in parser._actions:
            if hasattr(action, "full_help"):
                action.help = action.full_help
        parser.print_help()
        parser.exit()


def _quickdraw_command() -> str:
    """How to run this ``quickdraw`` from the working directory: ``quickdraw`` when that is the one on PATH, else
    its path (``.venv/bin/quickdraw`` under ``make run``, whose virtualenv is not on PATH)."""
    import os
    import shutil

    script = sys.argv[0]
    if Path(script).name != "quickdraw":  # python -m quickdraw: the console script beside that python, if any
        script = str(Path(sys.executable).with_name("quickdraw"))
        if not os.path.exists(script):
            return f"{sys.executable} -m quickdraw"
    on_path = shutil.which("quickdraw")
    if on_path and os.path.samefile(on_path, script):
        return "quickdraw"
    relative = os.path.relpath(script)
    return relative if not relative.startswith("..") else os.path.abspath(script)


def _option_type(annotation: Any) -> dict[str, Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return {"choices": list(typing.get_args(annotation))}
    if origin in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": annotation if annotation in (int, float, str, Path) else str}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand, one option per setting (generated from service.settings)."""
    from service.settings import ENV_PREFIX, Settings, setting_sections

    # Secrets are never options: a command line is visible to every user of the machine (ps, /proc).
    env_only = [n for n, i in Settings.model_fields.items() if (i.json_schema_extra or {}).get("env_only")]  # type: ignore[union-attr]
    p = sub.add_parser(
        "serve",
        help="run the gRPC classification gateway (playground, JSON API and metrics on HTTP)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Serve quickdraw.v1.Classifier over gRPC with dynamic batching, grpc.health.v1, reflection and\n"
            "Prometheus metrics at http://HOST:HTTP_PORT/metrics. The same HTTP port serves the JSON API\n"
            "(POST /v1/classify, GET /v1/model) and the playground page at / (--no-http-api turns both off).\n"
            "The embedded backend loads the highest version under --model-dir in-process.\n\n"
            f"Every option can also be set as an environment variable: --max-batch-size 64 is\n"
            f"{ENV_PREFIX}MAX_BATCH_SIZE=64. Options win over the environment.\n\n"
            "SIGTERM/SIGINT: health turns NOT_SERVING, new calls are refused, in-flight calls finish within\n"
            "--shutdown-grace-s, then the process exits 0.\n\n"
            "Secrets are environment variables only, never options (a command line is visible to every user):\n"
            + "".join(f"  {ENV_PREFIX}{n.upper()}: {Settings.model_fields[n].description}\n" for n in env_only)
            + f"\nThis lists the most-used options; --help-all lists all {len(Settings.model_fields) - len(env_only)}, "
            "grouped,\nand the configuration reference (docs/reference/configuration.md) describes each."
        ),
    )
    p.add_argument("--help-all", action=_HelpAll, nargs=0, help="show every option, grouped, and exit")
    sections = setting_sections()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, info in Settings.model_fields.items():
        if name in env_only:
            continue
        default = info.default
        shown = default.value if hasattr(default, "value") else default
        kind = _option_type(info.annotation)
        if name == "log_level":  # --log-level debug works as well as DEBUG
            kind["type"] = str.upper
        section = sections.get(name, "other")
        if section not in groups:
            groups[section] = p.add_argument_group(f"{section} options")
        full_help = f"{info.description} (env {ENV_PREFIX}{name.upper()}; default: {shown})".replace("%", "%%")
        action = groups[section].add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=None,
            help=full_help if name in COMMON_OPTIONS else argparse.SUPPRESS,
            **kind,
        )
        action.full_help = full_help  # type: ignore[attr-defined]
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the settings, run the app until a signal, exit 0."""
    from pydantic import ValidationError

    from quickdraw import quiet
    from quickdraw.commands.common import UsageError, resolve_model_dir
    from service.security.tls import port_in_use
    from service.settings import ENV_PREFIX, Settings

    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        for e in exc.errors(include_url=False):
            field = ".".join(str(x) for x in e["loc"]) or "settings"
            print(f"quickdraw serve: --{field.replace('_', '-')}: {e['msg']}", file=sys.stderr)
        return 2
    chosen = "model_dir" in given or f"{ENV_PREFIX}MODEL_DIR" in os.environ
    if settings.backend == "embedded":  # the tfserving backend needs no TensorFlow in this process
        require("tensorflow", "quickdraw serve --backend embedded")
        model_dir = resolve_model_dir(settings.model_dir if chosen else None, "--model-dir", f"{ENV_PREFIX}MODEL_DIR")
        settings = settings.model_copy(update={"model_dir": model_dir})
    elif not chosen:  # the tfserving backend reads only the labels there: the project's, from any directory
        with contextlib.suppress(UsageError):
            settings = settings.model_copy(update={"model_dir": resolve_model_dir(None, "--model-dir")})
    for port, option in ((settings.grpc_port, "--grpc-port"), (settings.http_port, "--http-port")):
        if port_in_use(settings.host, port):  # now, not after TensorFlow's import (App.start says it again if lost)
            raise UsageError(f"port {port} is in use: stop the other server or pass {option}")
    debug = settings.log_level == "DEBUG"
    quiet.configure(debug)
    if settings.backend == "embedded":
        quiet.import_tensorflow(debug)  # once, here; App.start finds it imported
    from service.app import App

    def ready(app: App) -> None:
        host = "localhost" if settings.host in ("0.0.0.0", "::", "[::]") else settings.host
        target = f"{host}:{app.grpc_port}"
        http = f"http{'s' if settings.http_tls else ''}://{host}:{app.http_port}"
        api = (f"  playground: {http}/\n"
               f"  JSON API: {http}/v1/classify, described by {http}/openapi.json\n"
               f"  Open Inference Protocol (KServe v2): {http}/v2, and inference.GRPCInferenceService on gRPC\n")
        print(f"quickdraw gateway ready: gRPC on {settings.host}:{app.grpc_port}, "
              f"metrics on http://{host}:{app.http_port}/metrics\n"
              + (api if settings.http_api else "")
              + f"  try: {EXAMPLE.format(quickdraw=_quickdraw_command(), target=target)}", flush=True)

    configure_logging(settings.log_level)
    app = App(settings)
    with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
        runner.run(app.run(on_ready=ready))
        if app.left_behind:  # a model load (or a render) still running in a thread: do not wait for it
            _exit_now(0)
    return 0


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop the setting ``event_loop`` names (None: asyncio's default)."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def _exit_now(code: int) -> None:
    """Flush and leave at once: threads that cannot be interrupted (TensorFlow loading a model) are not joined."""
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def configure_logging(level: str | None) -> None:
    """The gateway's logging: redaction of tokens and raw header lines first (every logger, every level; the app
    adds its configured tokens), then ``level`` for every logger, or INFO for the gateway's own lines."""
    import logging

    from service.security.redaction import install_log_redaction

    install_log_redaction()
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level is not None:
        root.setLevel(level)
        logging.getLogger("service").setLevel(logging.NOTSET)
    elif root.level > logging.INFO:
        logging.getLogger("service").setLevel(logging.INFO)
