"""The OpenAI-compatible HTTP server (`jisu serve`): FastAPI routes over one engine thread.

Import create_app from jisu.server.app; this package's own import stays light so the CLI starts fast.
"""
