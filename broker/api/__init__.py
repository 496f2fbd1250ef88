"""The HTTP API (FastAPI)."""

from broker.api.app import create_app

__all__ = ["create_app"]
