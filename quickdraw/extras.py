"""Optional dependencies: which extra of ``quickdraw-service`` brings each one, and the error when it is missing.

The base install is the slim gateway (``quickdraw serve --backend tfserving``, ``classify``, ``loadtest``, the
data commands). TensorFlow comes with the ``tf`` extra: the embedded backend, ``train``, ``evaluate`` and
``predict`` need it. A command that needs a missing extra stops with one line naming the ``pip install`` that
brings it, and exit code 2 (``quickdraw.cli.main``).
"""

from __future__ import annotations

import importlib.util

DISTRIBUTION = "quickdraw-service"

#: Top-level module -> the extra that installs it (pyproject.toml, [project.optional-dependencies]).
EXTRA_OF: dict[str, str] = {
    "tensorflow": "tf",
    "tensorflow_serving": "tf",
    "tensorboard": "tf",
    "keras": "tf",
    "matplotlib": "plot",
}

#: How the error names each module.
_SHOWN: dict[str, str] = {"tensorflow": "TensorFlow", "tensorflow_serving": "tensorflow-serving-api",
                          "matplotlib": "matplotlib", "tensorboard": "TensorBoard", "keras": "Keras"}  # fmt: skip


class MissingExtra(Exception):
    """A command needs a module of an extra that this install lacks; the message names the pip command."""

    def __init__(self, module: str, what: str = "this command") -> None:
        self.module = module.split(".")[0]
        self.extra = EXTRA_OF.get(self.module, "tf")
        shown = _SHOWN.get(self.module, self.module)
        super().__init__(
            f"{what} needs {shown}, which is not installed: pip install '{DISTRIBUTION}[{self.extra}]'"
        )


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (``sys.modules[name] = None`` counts as absent)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, what: str = "this command") -> None:
    """Raise :class:`MissingExtra` unless ``module`` (e.g. ``"tensorflow"``) is installed."""
    if not installed(module):
        raise MissingExtra(module, what)


def from_import_error(exc: ImportError) -> MissingExtra | None:
    """The :class:`MissingExtra` an import error stands for, or None when the module belongs to no extra."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.split(".")[0]
    return MissingExtra(top) if top in EXTRA_OF else None
