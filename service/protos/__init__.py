"""The vendored protocols' messages (TF Serving, OIP) in private descriptor pools, and tensor conversion."""
