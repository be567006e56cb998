"""The HTTP server (guards, /metrics, the playground) and the /v1 JSON API."""
