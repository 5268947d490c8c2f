"""Serving: an HTTP server that A1111 and OpenAI Images clients already speak, and a web page.

:func:`create_app` builds the FastAPI app; ``opensd serve`` runs it with uvicorn.
"""

from opensd.serving.app import create_app
from opensd.serving.limits import Limits

__all__ = ["Limits", "create_app"]
