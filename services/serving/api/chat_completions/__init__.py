"""POST /v1/chat/completions, whole or streamed as server-sent events."""
