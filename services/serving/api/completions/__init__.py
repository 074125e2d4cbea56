"""POST /v1/completions (text completions), whole or streamed as server-sent events."""
