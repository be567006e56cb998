"""trainer: Quick, Draw! files to a TensorFlow SavedModel that TF Serving and the gateway serve."""
