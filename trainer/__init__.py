"""trainer: Quick, Draw! files to a TensorFlow SavedModel that TF Serving and the gateway serve."""

#: Architecture names (``trainer.models.ARCHITECTURES`` holds the builders; importing it imports Keras).
ARCH_NAMES: tuple[str, ...] = ("qdnet", "seed")
DEFAULT_ARCH = "qdnet"
