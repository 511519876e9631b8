"""The OpenAI-compatible server: `qwenkit serve`, or `create_app(load, Settings(...))` for ASGI hosts.

protocol.py holds the request models, their bounds and the error shape; gate.py what a request meets
before routing (credentials, timeouts, size limits, the last catch for errors); generation.py turns
requests into engine requests and deltas into responses; app.py has the routes, /openapi.json and the
uvicorn runner.
"""

from .app import Settings, create_app, serve, served_name

__all__ = ["Settings", "create_app", "serve", "served_name"]
