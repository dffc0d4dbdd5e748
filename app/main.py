"""The ASGI app: ``uvicorn app.main:app`` (or ``python -m app``), configured from ``APP_*`` variables."""

from app.factory import create_app

app = create_app()
