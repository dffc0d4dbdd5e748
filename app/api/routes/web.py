"""The web page: one static file that calls the JSON API from the browser."""

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)

# The page is self-contained: its script and style are inline, the preview is a blob: URL, and it talks only
# to this service. The policy makes the browser hold it to that (a CDN link added by mistake fails loudly in
# the browser test instead of working online and breaking offline). Inline code is allowed rather than
# hashed because the page never turns service text into markup (textContent only), so there is nothing to
# inject into.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; "
    "script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; "
    "img-src blob: data:; "
    "connect-src 'self'; "
    "base-uri 'none'; "
    "form-action 'none'; "
    "frame-ancestors 'none'"
)


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
