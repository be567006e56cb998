"""The model contract: the names the trainer exports and the gateway serves, written here once.

The trainer (``trainer.export``) writes a SavedModel whose signature ``SIGNATURE_NAME`` takes ``INPUT_KEY``,
uint8 [n, 28, 28, 1], and gives the ``OUTPUTS``; it puts the class names in ``LABELS_PATH`` under the version
directory. The gateway (the embedded backend, TF Serving's API on the gateway, the settings' default signature)
reads the same names from here, and ``tests/test_contract.py`` checks the shipped SavedModel against them and
that no module of ``service`` or ``trainer`` spells them out again.

Plain constants: this module imports neither TensorFlow nor gRPC (``doodle`` is shared by both sides).
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Final

from doodle.drawing import BITMAP_SIDE

#: The signature the model is served under (TF Serving's default, ``kDefaultServingSignatureDefKey``).
SIGNATURE_NAME: Final = "serving_default"
#: ``method_name`` of that signature: a Predict signature, as TF Serving's ``VerifySignature`` accepts.
METHOD_NAME: Final = "tensorflow/serving/predict"

#: The one input: the drawings as bitmaps, strokes bright on dark (numpy_bitmap's convention).
INPUT_KEY: Final = "image"
#: Its dtype (numpy's and TensorFlow's name for it) and shape (``None``: any batch size).
INPUT_DTYPE: Final = "uint8"
INPUT_SHAPE: Final = (None, BITMAP_SIDE, BITMAP_SIDE, 1)

#: Softmax probabilities, float32 [n, classes] in the order of the labels file.
OUTPUT_KEY: Final = "probabilities"
#: The ``TOP_K`` best probabilities of each drawing, best first: float32 [n, k].
TOP_K_SCORES: Final = "top_k_scores"
#: Their class indices: int32 [n, k].
TOP_K_INDICES: Final = "top_k_indices"
#: Their class names: string [n, k].
TOP_K_LABELS: Final = "top_k_labels"
#: Width of the exported ``top_k_*`` outputs (fewer when the model has fewer classes: ``min(TOP_K, classes)``).
TOP_K: Final = 5
#: Out-of-class detection (models exported with it; older ones lack this output): float32 [n], higher means the
#: drawing looks more like one of the model's classes. A drawing is called known when its score is at least the
#: threshold in ``model_card.json`` under ``MODEL_CARD_OOD`` (``{"threshold": t, "operating_point": ...}``).
KNOWN_SCORE: Final = "known_score"
#: The model card's key for the out-of-class decision (threshold, operating point, score name, method).
MODEL_CARD_OOD: Final = "out_of_class"
#: The model card's key for the validation distribution of what the model answers (issue 26, model health): the
#: class mix of its top-1 predictions, histograms of the top-1 probability, of ``KNOWN_SCORE`` and of the ink
#: fraction, and the out-of-class rate, measured on the validation split at export (``trainer.distribution``).
#: The gateway counts the same things per served version and exports this entry beside them
#: (``service.core.modelhealth``), so that Prometheus can compare the two.
MODEL_CARD_DISTRIBUTION: Final = "validation_distribution"
#: Default upper bounds of the top-1 probability histogram (the card's entry says which it used).
TOP1_PROBABILITY_BOUNDS: Final = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
#: Default upper bounds of the ink fraction histogram: the share of the 784 pixels that are not 0 (numpy_bitmap
#: drawings: 0.1 to 0.5; a bitmap sent inverted, dark strokes on a light background, above 0.85).
INK_FRACTION_BOUNDS: Final = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: Default upper bounds of the ``KNOWN_SCORE`` histogram, for a version whose card has none (the trainer writes
#: bounds fitted to each model's scores: the threshold and quantiles of the validation scores).
KNOWN_SCORE_BOUNDS: Final = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 8.0)
#: Every output of the signature, the probabilities first (``KNOWN_SCORE`` only in models exported with it).
OUTPUTS: Final = (OUTPUT_KEY, TOP_K_SCORES, TOP_K_INDICES, TOP_K_LABELS)
#: Each output's dtype (numpy's and TensorFlow's names; ``string`` is TensorFlow's).
OUTPUT_DTYPES: Final = {OUTPUT_KEY: "float32", TOP_K_SCORES: "float32", TOP_K_INDICES: "int32", TOP_K_LABELS: "string",
                         KNOWN_SCORE: "float32"}

#: The class names, one a line in output order, relative to a version directory (a SavedModel asset).
LABELS_PATH: Final = PurePosixPath("assets/labels.txt")

__all__ = [
    "INK_FRACTION_BOUNDS",
    "INPUT_DTYPE",
    "INPUT_KEY",
    "INPUT_SHAPE",
    "KNOWN_SCORE",
    "KNOWN_SCORE_BOUNDS",
    "LABELS_PATH",
    "METHOD_NAME",
    "MODEL_CARD_DISTRIBUTION",
    "MODEL_CARD_OOD",
    "OUTPUTS",
    "OUTPUT_DTYPES",
    "OUTPUT_KEY",
    "SIGNATURE_NAME",
    "TOP1_PROBABILITY_BOUNDS",
    "TOP_K",
    "TOP_K_INDICES",
    "TOP_K_LABELS",
    "TOP_K_SCORES",
]
