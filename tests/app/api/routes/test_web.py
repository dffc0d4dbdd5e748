"""The web page at ``GET /``, driven in a real headless Chromium against a real service.

The service runs as ``uvicorn app.main:app`` in a subprocess, serving a random-init resnet18 on the CPU, so
the page is checked against the API exactly as a person's browser would meet it. The browser is Debian's
``chromium`` (``apt-get install -y chromium``; CI installs it): Playwright's own browser download needs the
internet, which this project's machines do not have.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, Page, expect, sync_playwright

from app.api.routes.web import router
from model.labels import CLASS_NAMES
from tests.support import images
from tests.support.checkpoints import make_checkpoint
from tests.support.service import live_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
PHONE = {"width": 390, "height": 844}  # CSS pixels of a common phone in portrait
PAGE_TIMEOUT_MS = 30_000
PAGE_IDS = ("file", "drop", "error", "model-version", "result-label", "result-confidence", "bars",
            "result-model-version", "busy", "preview")

# Records every state the page passes through, with whether the busy indicator showed, so the test can see
# the busy state however quickly the CPU answers.
RECORD_STATES = """
window.__states = [];
new MutationObserver(() => {
  const busy = document.getElementById("busy");
  window.__states.push({state: document.body.dataset.state, busyShown: !!busy && !busy.hidden,
                        ariaBusy: document.getElementById("output").getAttribute("aria-busy")});
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["data-state"]});
"""


def test_page_is_served_self_contained() -> None:
    """No browser or model needed: the route serves the page with the ids the browser test relies on."""
    app = FastAPI()
    app.include_router(router)
    with TestClient(app) as client:
        response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    for element_id in PAGE_IDS:
        assert f'id="{element_id}"' in response.text, f"the page lost #{element_id}"
    # Works offline: nothing is fetched from another origin (the CSP would block it anyway).
    assert "http://" not in response.text and "https://" not in response.text


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a live ``uvicorn app.main:app`` serving a random-init resnet18 on the CPU."""
    weights = make_checkpoint(tmp_path_factory.mktemp("web-checkpoint"))
    # Only the settings named here: an APP_* left in the caller's shell must not change what is tested.
    environment = {"APP_WEIGHTS": str(weights), "APP_DEVICE": "cpu"}
    command = ("-m", "uvicorn", "app.main:app", "--host", "127.0.0.1")
    with live_server(tmp_path_factory.mktemp("web-service"), environment, command=command) as server:
        yield server.url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        message = (f"the web page test needs Debian's Chromium at {CHROMIUM}: run "
                   "`apt-get update && apt-get install -y chromium` (never `playwright install`: it cannot "
                   "download browsers here)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    # The first prediction on a busy 2-core CI machine can take longer than expect()'s 5 s default.
    expect.set_options(timeout=PAGE_TIMEOUT_MS)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page_errors() -> list[str]:
    """Uncaught exceptions and console errors (CSP violations among them) seen while the page ran."""
    return []


@pytest.fixture
def page(browser: Browser, service: str, page_errors: list[str]) -> Iterator[Page]:
    context = browser.new_context(viewport=PHONE, base_url=service)
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    context.add_init_script(RECORD_STATES)
    page = context.new_page()
    page.on("console", lambda message: message.type == "error" and page_errors.append(message.text))
    page.on("pageerror", lambda error: page_errors.append(f"uncaught: {error}"))
    yield page
    context.close()


def unexpected(page_errors: list[str]) -> list[str]:
    # Chromium logs every non-2xx fetch this way; the tests that expect one check the page's own message.
    return [error for error in page_errors if "Failed to load resource" not in error]


def open_page(page: Page, service: str) -> dict:
    """Open ``/`` and wait for its header to show the model; returns ``GET /model``."""
    model = httpx.get(f"{service}/model", timeout=10).raise_for_status().json()
    page.goto("/")
    expect(page.locator("#model-version")).to_have_text(model["version"])
    return model


@pytest.mark.server
def test_page_classifies_a_chosen_image_as_the_api_does(
    page: Page, service: str, page_errors: list[str], tmp_path: Path
) -> None:
    image = images.png()
    answer = httpx.post(f"{service}/predict", files={"file": ("gradient.png", image, "image/png")}, timeout=30)
    assert answer.status_code == 200, answer.text
    prediction = answer.json()
    model = open_page(page, service)

    page.set_input_files("#file", files=[{"name": "gradient.png", "mimeType": "image/png", "buffer": image}])
    expect(page.locator("body")).to_have_attribute("data-state", "done")

    label = page.text_content("#result-label")
    assert label in CLASS_NAMES
    assert label == prediction["label"]
    assert page.text_content("#result-model-version") == prediction["model_version"] == model["version"]
    expect(page.locator("#preview")).to_be_visible()
    expect(page.locator("#error")).to_be_hidden()

    bars = page.locator("#bars .bar")
    expect(bars).to_have_count(10)
    assert page.locator("#bars .bar-label").all_text_contents() == list(CLASS_NAMES)
    shown = [float(text.rstrip("%")) for text in page.locator("#bars .bar-pct").all_text_contents()]
    assert abs(sum(shown) - 100) < 0.6, f"percentages sum to {sum(shown)}"  # ten roundings of ≤0.05 each
    for name, percent in zip(CLASS_NAMES, shown, strict=True):
        assert percent == pytest.approx(100 * prediction["probabilities"][name], abs=0.051), name
    top = page.locator("#bars .bar.top")
    expect(top).to_have_count(1)
    assert top.get_attribute("data-label") == label

    states = page.evaluate("window.__states")
    assert [s["state"] for s in states] == ["busy", "done"], states
    assert states[0]["busyShown"] and states[0]["ariaBusy"] == "true", "no busy state while waiting"
    expect(page.locator("#busy")).to_be_hidden()

    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], "scrolls sideways"
    assert unexpected(page_errors) == []
    page.screenshot(path=tmp_path / "result-phone.png", full_page=True)
    page.set_viewport_size({"width": 1024, "height": 768})
    page.screenshot(path=tmp_path / "result-desktop.png", full_page=True)


@pytest.mark.server
def test_page_shows_the_services_detail_for_a_file_that_is_not_an_image(
    page: Page, service: str, page_errors: list[str], tmp_path: Path
) -> None:
    text = b"this is not an image\n"
    answer = httpx.post(f"{service}/predict", files={"file": ("notes.txt", text, "text/plain")}, timeout=30)
    assert answer.status_code == 415, answer.text
    detail = answer.json()["detail"]
    open_page(page, service)

    page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": text}])
    expect(page.locator("body")).to_have_attribute("data-state", "error")
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text(detail)
    expect(error).to_contain_text("415")
    expect(page.locator("#result")).to_be_hidden()
    expect(page.locator("#preview")).to_be_hidden()
    assert unexpected(page_errors) == []
    page.screenshot(path=tmp_path / "error-phone.png", full_page=True)


@pytest.mark.server
def test_a_dropped_image_is_classified(page: Page, service: str) -> None:
    image = images.png(32, 32)
    prediction = httpx.post(
        f"{service}/predict", files={"file": ("dropped.png", image, "image/png")}, timeout=30
    ).json()
    open_page(page, service)

    # A real drag from the desktop cannot be scripted; a drop event carrying the file takes the same path.
    page.evaluate(
        """(bytes) => {
          const data = new DataTransfer();
          data.items.add(new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"}));
          document.getElementById("drop").dispatchEvent(
            new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
        }""",
        list(image),
    )
    expect(page.locator("body")).to_have_attribute("data-state", "done")
    expect(page.locator("#result-label")).to_have_text(prediction["label"])


@pytest.mark.server
def test_the_picker_is_labelled_and_reached_by_keyboard(page: Page, service: str) -> None:
    open_page(page, service)
    # The accessible name a screen reader announces for the picker (Chromium exposes a file input as a button).
    expect(page.get_by_role("button", name="Drop an image here or choose one", exact=True)).to_have_id("file")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "file"


@pytest.mark.server
def test_the_header_shows_why_no_model_answers(page: Page) -> None:
    detail = "No model is loaded: set APP_WEIGHTS to a checkpoint directory and restart."
    page.route("**/model", lambda route: route.fulfill(status=503, json={"detail": detail}))
    page.goto("/")
    problem = page.locator("#model-problem")
    expect(problem).to_be_visible()
    expect(problem).to_contain_text(detail)
    expect(page.locator("#model-version")).to_be_hidden()
