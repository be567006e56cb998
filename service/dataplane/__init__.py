"""The data plane: one pipeline behind every front door (admission, conversion off the loop, preprocessing,
version resolution, batching, the backend, the answer), and the batcher it feeds."""
