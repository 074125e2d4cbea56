"""The OpenAI-compatible HTTP API: one folder per endpoint, errors in OpenAI's JSON shape."""
