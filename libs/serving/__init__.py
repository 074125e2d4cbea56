"""The serving service's contract for its gRPC callers (the trainer's rollouts, tools):
the client of its admin and rollout services."""
