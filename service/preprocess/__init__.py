"""Requests to model input: counting on the wire, validation, and decoding and rendering in worker processes."""
