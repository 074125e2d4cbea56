"""GET /version, as vLLM serves it."""
