"""`engine serve`: the explanation server (`pip install -e ".[serve]"`: FastAPI, uvicorn, prometheus-client)."""

from .app import create_app

__all__ = ["create_app"]
