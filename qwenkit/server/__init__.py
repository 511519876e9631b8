"""The OpenAI-compatible server: `qwenkit serve`, or `create_app(load, Settings(...))` for ASGI hosts.

protocol.py holds the request models and the error shape, generation.py turns requests into engine
requests and deltas into responses, app.py has the routes, auth, limits and the uvicorn runner.
"""

from .app import Settings, create_app, serve, served_name

__all__ = ["Settings", "create_app", "serve", "served_name"]
