"""The quickdraw.v1 Classifier over gRPC (Classify, ClassifyStream, GetModelInfo)."""
