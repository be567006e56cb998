"""The data plane and what every door shares: the pipeline, the batcher, versions, errors, metrics, stream slots."""
