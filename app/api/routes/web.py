"""The web page: one static file that calls the JSON API from the browser, and the example images it offers
(the repository's ``examples/*.png``, read-only: only the PNG files directly in that folder, by name)."""

import re
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

from app.api.deps import SettingsDep
from app.api.errors import NotFound

router = APIRouter(include_in_schema=False)

# The page is self-contained: its script and style are inline, the preview is a blob: URL, the heat map a
# data: URL drawn on a canvas, the examples come from this service, and it talks only to this service. The
# policy makes the browser hold it to that (a CDN link added by mistake fails loudly in the browser test
# instead of working online and breaking offline). Inline code is allowed rather than hashed because the page
# never turns service text into markup (textContent only), so there is nothing to inject into.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; "
    "script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; "
    "img-src 'self' blob: data:; "
    "connect-src 'self'; "
    "base-uri 'none'; "
    "form-action 'none'; "
    "frame-ancestors 'none'"
)
# A name is letters, digits, '-' or '_' and '.png': nothing that could climb out of the folder.
EXAMPLE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\.png")


@router.get("/", response_class=HTMLResponse)
def index() -> HTMLResponse:
    return HTMLResponse(
        files("app").joinpath("static/index.html").read_text(encoding="utf-8"),
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            # Revalidate each time, so a redeployed page is never mixed with a newer API from a stale cache.
            "Cache-Control": "no-cache",
        },
    )


def example_files(folder: Path) -> dict[str, Path]:
    """The example images by file name: regular PNG files directly in ``folder`` (no links, no subfolders)."""
    if not folder.is_dir():
        return {}
    return {path.name: path for path in sorted(folder.iterdir())
            if EXAMPLE_NAME.fullmatch(path.name) and path.is_file() and not path.is_symlink()}


@router.get("/examples")
def examples(settings: SettingsDep) -> dict[str, list[str]]:
    """The example images' file names, for the page to offer; empty where the folder is not deployed."""
    return {"examples": list(example_files(settings.examples_dir))}


@router.get("/examples/{name}")
def example(name: str, settings: SettingsDep) -> FileResponse:
    path = example_files(settings.examples_dir).get(name)
    if path is None:
        raise NotFound(f"no example image {name!r}: GET /examples lists them")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "public, max-age=3600"})
