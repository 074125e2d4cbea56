"""GET /health: 200 while the engine serves, 503 while starting, draining or dead."""
