"""Commands that need an extra this install lacks say which one, in one line, and exit 2.

Each case runs ``quickdraw`` in a subprocess whose ``sys.modules`` marks the extra's modules as absent
(``sys.modules[name] = None``: every import of them raises ModuleNotFoundError), as on a slim install.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import SHIPPED_MODEL

ROOT = Path(__file__).resolve().parents[1]
TF_MODULES = ("tensorflow", "tensorflow_serving", "tensorboard", "keras", "matplotlib")
TF_HINT = "pip install 'quickdraw-service[tf]'"


def quickdraw_without(blocked: tuple[str, ...], *args: str) -> subprocess.CompletedProcess[str]:
    """``quickdraw ARGS`` with the ``blocked`` modules absent."""
    code = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); "
            "from quickdraw.cli import main; sys.exit(main(sys.argv[1:]))")  # fmt: skip
    env = {**os.environ, "QUICKDRAW_BACKEND": "embedded"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--data", "{tmp}", "--out", "{tmp}/models"],
        ["evaluate", str(SHIPPED_MODEL), "--data", "{tmp}", "--no-speed"],
        ["predict", "--model", str(SHIPPED_MODEL), "{tmp}/cat.npy"],
        ["serve", "--backend", "embedded", "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0"],
        ["serve", "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0"],  # QUICKDRAW_BACKEND=embedded
    ],
    ids=["train", "evaluate", "predict", "serve-embedded", "serve-embedded-env"],
)
def test_a_command_that_needs_tensorflow_names_the_tf_extra(args: list[str], tmp_path: Path) -> None:
    done = quickdraw_without(TF_MODULES, *(a.format(tmp=tmp_path) for a in args))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"quickdraw {args[0]}: error: ") and "TensorFlow" in lines[0], lines[0]
    assert lines[0].endswith(TF_HINT), lines[0]
    assert not done.stdout
    assert not (tmp_path / "models").exists()


def test_loadtest_plots_name_the_plot_extra_before_any_load(tmp_path: Path) -> None:
    done = quickdraw_without(("matplotlib",), "loadtest", "--target", "127.0.0.1:9", "--data", str(tmp_path),
                             "--plot-dir", str(tmp_path / "plots"), "--count", "1")  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip() == ("quickdraw loadtest: error: quickdraw loadtest --plot-dir needs matplotlib, "
                                   "which is not installed: pip install 'quickdraw-service[plot]'")  # fmt: skip


def test_an_extra_module_imported_deeper_down_names_its_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The catch-all in ``quickdraw.cli.main``: a ModuleNotFoundError for an extra's module, wherever raised."""
    import quickdraw.commands.render as render
    from quickdraw.cli import main

    def deep(args: object) -> int:
        raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow.core.framework")

    monkeypatch.setattr(render, "run", deep)
    assert main(["render", "x.ndjson", "--out", "x.npy"]) == 2
    err = capsys.readouterr().err
    assert err == f"quickdraw render: error: this command needs TensorFlow, which is not installed: {TF_HINT}\n"


def test_other_missing_modules_are_not_blamed_on_an_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import quickdraw.commands.render as render
    from quickdraw.cli import main

    def deep(args: object) -> int:
        raise ModuleNotFoundError("No module named 'aiohttp'", name="aiohttp")

    monkeypatch.setattr(render, "run", deep)
    # one line, naming the module and no extra (issue 19: no tracebacks) ...
    assert main(["render", "x.ndjson", "--out", "x.npy"]) == 1
    err = capsys.readouterr().err
    assert err == "quickdraw render: error: ModuleNotFoundError: No module named 'aiohttp'\n"
    # ... and the exception itself with --debug
    with pytest.raises(ModuleNotFoundError, match="aiohttp"):
        main(["render", "x.ndjson", "--out", "x.npy", "--debug"])


def test_the_data_commands_and_help_need_no_tensorflow() -> None:
    for args in (["--help"], ["serve", "--help"], ["train", "--help"], ["classify", "--help"]):
        done = quickdraw_without(TF_MODULES, *args)
        assert done.returncode == 0, (args, done.stderr[-3000:])
