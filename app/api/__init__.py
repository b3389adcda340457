"""The HTTP API under /api/v1: models, routes and the error envelope."""
