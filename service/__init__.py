"""service: the gRPC gateway that validates drawings, batches them and calls the model backend."""
