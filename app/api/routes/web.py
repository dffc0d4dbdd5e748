"""The web page: one static file that calls the JSON API from the browser."""

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def index() -> HTMLResponse:
    return HTMLResponse(files("app").joinpath("static/index.html").read_text(encoding="utf-8"))
