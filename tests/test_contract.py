"""``doodle.contract`` is the model contract: the shipped SavedModel keeps it, and nobody else spells it out.

The shipped model's ``saved_model.pb`` is parsed with TensorFlow's own ``SavedModel`` message and its serving
signature compared with the contract: name, method, input key, dtype and shape, the output keys, their dtypes
and widths, and the labels asset. Then every module of ``service`` and ``trainer`` is parsed (``ast``) for a
string literal equal to one of the contract's names, which should come from ``doodle.contract`` instead.

Runtime: about 4 s, nearly all of it importing TensorFlow for the ``SavedModel`` message.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest
from conftest import ROOT
from harness import SHIPPED_MODEL

from doodle import contract
from service.backends import find_versions, read_labels

# The contract's strings that no module should write itself. The input key "image" is also an ordinary word
# (the drawing kind of the native API, image decoding), so it is looked for only where it means the input.
CONTRACT_STRINGS = {
    contract.SIGNATURE_NAME,
    contract.METHOD_NAME,
    *contract.OUTPUTS,
    str(contract.LABELS_PATH),
    contract.LABELS_PATH.name,
    contract.LABELS_PATH.parent.name,
}
INPUT_KEY_SCOPE = ("trainer", "service/frontends/tfserving/grpc_api.py", "service/backends")
SCANNED = ("service", "trainer")
#: Modules allowed to spell a contract name (none).
ALLOWED: set[str] = set()


def contract_literals(source: str, with_input_key: bool) -> list[tuple[int, str]]:
    """(line, value) of every string literal in ``source`` equal to a name of the contract."""
    names = CONTRACT_STRINGS | ({contract.INPUT_KEY} if with_input_key else set())
    return [
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
    ]


def test_the_scan_finds_a_repeated_name() -> None:
    """The scan itself: a literal is found in either quoting, a name inside a longer string is not."""
    source = "A = 'serving_default'\nB = {\"top_k_labels\": 1}\nC = 'image'\nD = 'the serving_default signature'\n"
    assert contract_literals(source, with_input_key=False) == [(1, "serving_default"), (2, "top_k_labels")]
    assert (3, "image") in contract_literals(source, with_input_key=True)


def test_no_module_repeats_the_contract() -> None:
    found = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in ALLOWED:
                continue
            with_input_key = any(rel == s or rel.startswith(f"{s}/") for s in INPUT_KEY_SCOPE)
            found += [f"{rel}:{line}: {value!r}" for line, value in contract_literals(path.read_text(), with_input_key)]
    assert not found, "use doodle.contract's names instead of:\n" + "\n".join(found)


def test_the_contract_module_loads_neither_tensorflow_nor_grpc() -> None:
    code = "import sys, doodle.contract; print(sorted(m for m in ('tensorflow', 'grpc', 'keras') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.skipif(not find_versions(SHIPPED_MODEL), reason=f"no SavedModel under {SHIPPED_MODEL}")
def test_the_shipped_savedmodel_keeps_the_contract() -> None:
    tf = pytest.importorskip("tensorflow", reason="parsing saved_model.pb takes TensorFlow's SavedModel message")
    from tensorflow.core.protobuf import saved_model_pb2

    version_dir = SHIPPED_MODEL / str(find_versions(SHIPPED_MODEL)[-1])
    saved = saved_model_pb2.SavedModel.FromString((version_dir / "saved_model.pb").read_bytes())
    (graph,) = [g for g in saved.meta_graphs if tf.saved_model.SERVING in g.meta_info_def.tags]
    sig = graph.signature_def[contract.SIGNATURE_NAME]
    assert sig.method_name == contract.METHOD_NAME

    def dtype(info: object) -> str:
        return str(tf.dtypes.as_dtype(info.dtype).name)  # type: ignore[attr-defined]

    def shape(info: object) -> tuple[int | None, ...]:
        return tuple(None if d.size == -1 else d.size for d in info.tensor_shape.dim)  # type: ignore[attr-defined]

    assert list(sig.inputs) == [contract.INPUT_KEY]
    image = sig.inputs[contract.INPUT_KEY]
    assert (dtype(image), shape(image)) == (contract.INPUT_DTYPE, contract.INPUT_SHAPE)

    labels = read_labels(version_dir)  # from contract.LABELS_PATH
    assert (version_dir / contract.LABELS_PATH).is_file() and len(labels) > 1
    k = min(contract.TOP_K, len(labels))
    # the shipped model has the out-of-class score (issue 18); older exports lack it, which the gateway accepts
    assert sorted(sig.outputs) == sorted((*contract.OUTPUTS, contract.KNOWN_SCORE))
    for name in contract.OUTPUTS:
        width = len(labels) if name == contract.OUTPUT_KEY else k
        assert (dtype(sig.outputs[name]), shape(sig.outputs[name])) == (contract.OUTPUT_DTYPES[name], (None, width))
    known = sig.outputs[contract.KNOWN_SCORE]
    assert (dtype(known), shape(known)) == (contract.OUTPUT_DTYPES[contract.KNOWN_SCORE], (None,))
    card = json.loads((version_dir / "model_card.json").read_text())
    assert card[contract.MODEL_CARD_OOD]["score"] == contract.KNOWN_SCORE
    assert isinstance(card[contract.MODEL_CARD_OOD]["threshold"], float)
    # the labels file is the SavedModel's asset (TensorFlow keeps assets in assets/ under the version directory)
    assert contract.LABELS_PATH.parent.name == "assets"
    assert [a.filename for a in graph.asset_file_def] == [contract.LABELS_PATH.name]
