"""The client's ``quickdraw`` command: ``quickdraw classify FILE...`` against a running gateway.

Two distributions install a ``quickdraw`` script: this one (quickdraw-client) and the server's
(quickdraw-service, which depends on this one). Whichever wrote the script last, it behaves the same: when the
server package is installed, this entry point runs the server's full command line (``serve``, ``train``,
``loadtest``... and ``classify``, which is this module's, with the server's readers for ``.bin`` and ``.npz``);
without it, only the client commands exist. A failure prints one line, ``quickdraw COMMAND: error: ...``, and
exits non-zero; ``--debug`` (anywhere on the line, or ``QUICKDRAW_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from quickdraw_client.cmdline import DEBUG_FLAG, UsageError, one_line, split_debug
from quickdraw_client.files import InputError, Reader, read_drawings
from quickdraw_client.security import TOKEN_ENV, ClientSecurity, read_token_file

CHUNK = 64  # drawings per call
#: The console script this distribution installs, and the server package too (its full command line).
SCRIPT = "quickdraw"
DISTRIBUTION = "quickdraw-client"
CLIENT_FORMATS = "FILE is a PNG/JPEG (sent as an image), an .ndjson (each line, sent as strokes; raw files as raw\n" \
                 "strokes, normalised by the server) or an .npy (each row, as a bitmap)."  # fmt: skip


def add_security_options(p: argparse.ArgumentParser) -> None:
    """TLS, mTLS and bearer-token options for commands that call the gateway."""
    g = p.add_argument_group(
        "security", "a gateway with TLS, mTLS or a bearer token (any --tls-* option turns TLS on); the token comes "
        f"from --token-file or the {TOKEN_ENV} environment variable, never from the command line",
    )
    g.add_argument("--tls", action="store_true", help="use TLS, trusting the system's root CAs")
    g.add_argument("--tls-ca-file", type=Path, metavar="PEM", help="CA certificates to verify the gateway with")
    g.add_argument("--tls-cert-file", type=Path, metavar="PEM", help="client certificate (mTLS), with --tls-key-file")
    g.add_argument("--tls-key-file", type=Path, metavar="PEM", help="private key of --tls-cert-file")
    g.add_argument("--tls-server-name", metavar="NAME", help="name to verify in the gateway's certificate instead "
                   "of the target's host")  # fmt: skip
    g.add_argument("--token-file", type=Path, metavar="FILE", help="file whose first line is the bearer token")


def client_security(args: argparse.Namespace) -> ClientSecurity:
    """The ClientSecurity the options of :func:`add_security_options` ask for (ValueError when they are wrong)."""
    token = read_token_file(args.token_file, "--token-file")[0] if args.token_file else None
    security = ClientSecurity.from_env(tls=args.tls, ca_file=args.tls_ca_file, cert_file=args.tls_cert_file,
                                       key_file=args.tls_key_file, server_name=args.tls_server_name, token=token)
    security.credentials()  # reads the PEM files now, so a wrong path is reported before any call
    return security


def add_classify_parser(sub: argparse._SubParsersAction, formats: str = CLIENT_FORMATS) -> argparse.ArgumentParser:
    """Register ``classify``; ``formats`` describes the files this install reads."""
    p = sub.add_parser(
        "classify",
        help="classify drawings with a running gateway (gRPC)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Send drawings to the gateway and print the top classes of each, e.g.\n"
            "  cat.ndjson:1  cat 0.96  sun 0.01  train 0.00\n"
            "or, for a drawing the model does not know (models with an out-of-class decision):\n"
            "  car.ndjson:3  not a known class (known_score 0.12 < 0.50); closest: dog 0.67  cat 0.20  horse 0.05\n\n"
            + formats
        ),
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--target", default="localhost:50051", help="gateway address (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=3, help="classes per drawing (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N drawings per file")
    p.add_argument("--version", type=int, default=None, help="model version (default: the highest served)")
    p.add_argument("--timeout-s", type=float, default=10.0, help="deadline per call (default: %(default)s)")
    add_security_options(p)
    p.set_defaults(func=run_classify)
    return p


def check_files(files: Sequence[Path]) -> None:
    """A UsageError for the first input that is not a readable file, before anything is sent."""
    for path in files:
        if not path.exists():
            raise UsageError(f"{path}: no such file (relative to {Path.cwd()})")
        if not path.is_file():
            raise UsageError(f"{path}: not a file")


def run_classify(args: argparse.Namespace, reader: Reader = read_drawings) -> int:
    """Classify every drawing of every file, CHUNK drawings a call; print one line each (the same lines from
    the client and the server package). Exit 1 when a call failed."""
    import grpc

    from quickdraw_client.client import QuickDrawClient, describe_error

    check_files(args.files)
    client = QuickDrawClient(args.target, timeout_s=args.timeout_s, security=client_security(args))
    failed = 0
    with client:
        for path in args.files:
            items = list(reader(path, args.limit))
            width = max((len(n) for n, _, _ in items), default=0)
            for raw in (False, True):
                group = [(n, d) for n, d, r in items if r is raw]
                for start in range(0, len(group), CHUNK):
                    chunk = group[start : start + CHUNK]
                    try:
                        results = client.classify([d for _, d in chunk], top_k=args.top_k, version=args.version,
                                                  raw=raw)  # fmt: skip
                    except grpc.RpcError as err:
                        code = err.code()  # type: ignore[attr-defined]
                        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                            raise UsageError(f"cannot reach the gateway at {args.target} ({code.name}): is 'quickdraw "
                                             "serve' running there? Pass --target HOST:PORT") from err  # fmt: skip
                        print(f"{path}: {describe_error(err)}", file=sys.stderr)
                        failed += 1
                        continue
                    for (name, _), result in zip(chunk, results, strict=True):
                        print(f"{name:<{width}}  {result}", flush=True)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """The client-only command line."""
    parser = argparse.ArgumentParser(
        prog="quickdraw",
        description="Quick, Draw! doodle classification: the client (quickdraw-client). The server package "
        "(quickdraw-service) adds serve, train, loadtest and the data commands to this same command.",
    )
    parser.add_argument(DEBUG_FLAG, action="store_true", help="show the traceback of a failure (or QUICKDRAW_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_classify_parser(sub)
    return parser


def run_command(args: argparse.Namespace, debug: bool) -> int:
    """Run ``args.func`` and turn a failure into one line on stderr (the traceback with ``debug``)."""
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"quickdraw {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, (UsageError, InputError, ValueError)) else 1


def full_cli() -> Callable[[Sequence[str] | None], int] | None:
    """The ``quickdraw`` console script of another installed distribution (the server package's full command
    line), or None when there is none. Found through the entry point that distribution declares (its installed
    metadata), so this package names no module of the server's: the server depends on the client, not back."""
    for entry in importlib.metadata.entry_points(group="console_scripts", name=SCRIPT):
        if entry.dist is not None and _canonical(entry.dist.name) == DISTRIBUTION:
            continue
        try:
            return entry.load()
        except ModuleNotFoundError as exc:  # metadata left behind by a removed package: as if it were not there
            if exc.name is None or not f"{entry.module}.".startswith(f"{exc.name}."):
                raise
    return None


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(argv: Sequence[str] | None = None) -> int:
    """The ``quickdraw`` script of quickdraw-client: the server's full command line when it is installed."""
    full_main = full_cli()
    if full_main is not None:
        return int(full_main(argv))
    argv, debug = split_debug(argv)
    args = build_parser().parse_args(argv)
    return run_command(args, debug)


if __name__ == "__main__":
    sys.exit(main())
