"""The web page at ``GET /``, driven in a real headless Chromium against a real service.

The service runs as ``uvicorn app.main:app`` in a subprocess, serving the shipped weights/fastcnn (calibrated,
with an OOD rule) on the CPU, so the page is checked against the API exactly as a person's browser would meet
it. ``PAGE_SCREENSHOT=docs/page.png`` makes the example test save its screenshot there (the README's). The
browser is Debian's ``chromium`` (``apt-get install -y chromium``; CI installs it): Playwright's own browser
download needs the internet, which this project's machines do not have.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from app.api.errors import install_error_handlers
from app.api.routes import web
from app.api.routes.web import router
from app.config import Settings
from model.labels import CLASS_NAMES
from tests.support import REPO_ROOT, images
from tests.support.service import live_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
PHONE = {"width": 390, "height": 844}  # CSS pixels of a common phone in portrait
PAGE_TIMEOUT_MS = 30_000
PAGE_IDS = ("file", "drop", "error", "model-version", "result-label", "result-confidence", "bars",
            "result-model-version", "busy", "preview", "heatmap", "ood-warning", "examples", "model-calibration")
SHIPPED = REPO_ROOT / "weights" / "fastcnn"
TOP_K = 5  # bars the page shows

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


def test_the_examples_are_listed_and_served_read_only_from_examples_only(tmp_path) -> None:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.settings = Settings()  # APP_EXAMPLES_DIR's default: the repository's examples/
    with TestClient(app) as client:
        listed = client.get("/examples").json()["examples"]
        assert listed == sorted(path.name for path in (REPO_ROOT / "examples").glob("*.png")) and "cat.png" in listed
        cat = client.get("/examples/cat.png")
        assert cat.status_code == 200 and cat.headers["content-type"] == "image/png"
        assert cat.content == (REPO_ROOT / "examples" / "cat.png").read_bytes()
        for name in ("README.md", "..%2Fweights%2Ffastcnn%2Fcard.json", "unicorn.png", "%2Fetc%2Fpasswd"):
            assert client.get(f"/examples/{name}").status_code == 404, name
        assert client.post("/examples/cat.png").status_code == 405
    # A link inside the folder is not followed, and no folder at all (a deployment without it) lists nothing.
    (tmp_path / "real.png").write_bytes(images.png())
    (tmp_path / "link.png").symlink_to(REPO_ROOT / "examples" / "cat.png")
    assert list(web.example_files(tmp_path)) == ["real.png"]
    assert web.example_files(tmp_path / "missing") == {}
    # APP_EXAMPLES_DIR moves the folder (the image keeps it at /app/examples).
    app.state.settings = Settings(examples_dir=tmp_path)
    with TestClient(app) as client:
        assert client.get("/examples").json()["examples"] == ["real.png"]
        assert client.get("/examples/cat.png").status_code == 404


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a live ``uvicorn app.main:app`` serving the shipped weights/fastcnn on the CPU."""
    # Only the settings named here: an APP_* left in the caller's shell must not change what is tested.
    environment = {"APP_WEIGHTS": str(SHIPPED), "APP_DEVICE": "cpu",
                   "APP_STATE_DIR": str(tmp_path_factory.mktemp("web-state"))}
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
    answer = httpx.post(f"{service}/predict?top_k={TOP_K}", files={"file": ("gradient.png", image, "image/png")},
                        timeout=30)
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
    expect(bars).to_have_count(TOP_K)
    assert page.locator("#bars .bar-label").all_text_contents() == [entry["label"] for entry in prediction["top_k"]]
    shown = [float(text.rstrip("%")) for text in page.locator("#bars .bar-pct").all_text_contents()]
    assert shown == sorted(shown, reverse=True)
    for entry, percent in zip(prediction["top_k"], shown, strict=True):
        assert percent == pytest.approx(100 * entry["probability"], abs=0.051), entry["label"]
    expect(page.locator("#bars-title")).to_have_text(f"The {TOP_K} most likely classes (calibrated probabilities)")
    top = page.locator("#bars .bar.top")
    expect(top).to_have_count(1)
    assert top.get_attribute("data-label") == label

    states = page.evaluate("window.__states")
    assert [s["state"] for s in states] == ["busy", "done"], states
    assert states[0]["busyShown"] and states[0]["ariaBusy"] == "true", "no busy state while waiting"
    expect(page.locator("#busy")).to_be_hidden()

    expect(page.locator("body")).to_have_attribute("data-heatmap", "done")
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


def heatmap_alpha(page: Page) -> list[list[int]]:
    """The overlay canvas's opacity per pixel (the page draws the map's gray level as opacity)."""
    return page.evaluate("""() => {
      const canvas = document.getElementById("heatmap");
      const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
      const rows = [];
      for (let y = 0; y < canvas.height; y++) {
        rows.push([]);
        for (let x = 0; x < canvas.width; x++) rows[y].push(data[4 * (y * canvas.width + x) + 3]);
      }
      return rows;
    }""")


@pytest.mark.server
def test_an_example_click_shows_the_calibrated_answer_the_model_and_the_heat_map_over_it(
    page: Page, service: str, page_errors: list[str], tmp_path: Path
) -> None:
    cat = (REPO_ROOT / "examples" / "cat.png").read_bytes()
    prediction = httpx.post(f"{service}/predict?top_k={TOP_K}", files={"file": ("cat.png", cat, "image/png")},
                            timeout=30).json()
    explanation = httpx.post(f"{service}/explain", files={"file": ("cat.png", cat, "image/png")}, timeout=30)
    model = open_page(page, service)
    page.set_viewport_size({"width": 1024, "height": 900})
    # The page shows the served card's own figures, one decimal, as GET /model gives them.
    expect(page.locator("#model-accuracy")).to_have_text(f"{100 * model['test_accuracy']:.1f}%")
    calibration = model["calibration"]
    expect(page.locator("#model-calibration")).to_contain_text(f"temperature {calibration['temperature']:.3f}")
    expect(page.locator("#model-calibration")).to_contain_text(
        f"{100 * calibration['test_ece_before']:.1f}% → {100 * calibration['test_ece_after']:.1f}%")
    expect(page.locator("#example-list .example")).to_have_count(10)

    page.locator('.example[data-name="cat.png"]').click()
    expect(page.locator("body")).to_have_attribute("data-heatmap", "done")
    expect(page.locator("#result-label")).to_have_text("cat")
    assert prediction["label"] == "cat" and prediction["in_distribution"] is True
    expect(page.locator("#result-confidence")).to_have_text(f"{100 * prediction['confidence']:.1f}% confident")
    expect(page.locator("#ood-warning")).to_be_hidden()
    assert page.get_attribute("body", "data-ood") == "in"
    expect(page.locator("#heatmap")).to_be_visible()
    expect(page.locator("#heatmap-note")).to_contain_text("“cat”")
    # The overlay is the service's map: its opacity follows the PNG's gray level, peak where the PNG peaks.
    served = np.asarray(Image.open(io.BytesIO(explanation.content)), dtype=np.float64)
    alpha = np.array(heatmap_alpha(page), dtype=np.float64)
    assert alpha.shape == served.shape == (32, 32)
    assert np.abs(alpha - 0.7 * served).max() <= 1.0
    # Over the upload: the canvas covers the preview's box exactly.
    assert page.locator("#heatmap").bounding_box() == page.locator("#preview").bounding_box()
    assert unexpected(page_errors) == []
    page.screenshot(path=os.environ.get("PAGE_SCREENSHOT") or tmp_path / "page.png", full_page=True)


@pytest.mark.server
def test_an_image_unlike_any_photo_gets_the_warning_in_plain_words(page: Page, service: str) -> None:
    noise = images.encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)),
                          "PNG")
    answer = httpx.post(f"{service}/predict", files={"file": ("noise.png", noise, "image/png")}, timeout=30).json()
    assert answer["in_distribution"] is False, "the shipped model's energy rule flags uniform noise (AUROC 1.0)"
    open_page(page, service)
    page.set_input_files("#file", files=[{"name": "noise.png", "mimeType": "image/png", "buffer": noise}])
    expect(page.locator("body")).to_have_attribute("data-state", "done")
    warning = page.locator("#ood-warning")
    expect(warning).to_be_visible()
    expect(warning).to_contain_text("does not look like the photos this model learned from")
    assert page.get_attribute("body", "data-ood") == "out"


@pytest.mark.server
def test_a_model_without_an_ood_rule_warns_of_nothing(page: Page, service: str) -> None:
    image = images.png()
    answer = httpx.post(f"{service}/predict?top_k={TOP_K}", files={"file": ("a.png", image, "image/png")},
                        timeout=30).json()
    uncalibrated = answer | {"in_distribution": None, "ood_score": None}
    page.route("**/predict?*", lambda route: route.fulfill(status=200, json=uncalibrated))
    open_page(page, service)
    page.set_input_files("#file", files=[{"name": "a.png", "mimeType": "image/png", "buffer": image}])
    expect(page.locator("body")).to_have_attribute("data-state", "done")
    expect(page.locator("#ood-warning")).to_be_hidden()
    assert page.get_attribute("body", "data-ood") == "unknown"


@pytest.mark.server
def test_a_busy_explainer_leaves_the_answer_and_says_why_there_is_no_map(page: Page, service: str) -> None:
    detail = "all 1 explanation slots are busy (APP_EXPLAIN_CONCURRENCY=1); retry in 1 s"
    page.route("**/explain?*", lambda route: route.fulfill(status=503, json={"detail": detail}))
    open_page(page, service)
    page.set_input_files("#file", files=[{"name": "a.png", "mimeType": "image/png", "buffer": images.png()}])
    expect(page.locator("body")).to_have_attribute("data-heatmap", "error")
    expect(page.locator("#heatmap-note")).to_contain_text(detail)
    expect(page.locator("#heatmap")).to_be_hidden()
    expect(page.locator("#result")).to_be_visible()
