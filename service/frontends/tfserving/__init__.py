"""TF Serving's PredictionService and ModelService on the gateway."""
