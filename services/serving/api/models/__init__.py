"""GET /v1/models and /v1/models/{model}: the base model and every servable adapter."""
