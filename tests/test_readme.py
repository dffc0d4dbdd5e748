"""The README's first screen is what a new user and CI run; keep it executable, in step with CI, short, and
its links (and those of docs/ and benchmarks/README.md) pointing at files that exist."""

import json
import math
import re
import subprocess

import httpx
import pytest

from tests.support import REPO_ROOT

MAX_BYTES = 12 * 1024  # what the project is, the two commands, an example, the API, links: details are in docs/


def readme_commands() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    first_screen = text[: text.index("\n## ")] if "\n## " in text else text
    return re.findall(r"```bash\n(.+?)\n```", first_screen, flags=re.S)


def test_first_screen_gives_exactly_two_commands_start_and_test():
    commands = readme_commands()
    assert len(commands) == 2
    start, test = commands
    assert "python -m app" in start
    assert "pytest" in test


def test_ci_runs_the_readme_test_command_verbatim():
    ci_script = (REPO_ROOT / ".ci" / "run").read_text()
    test_command = readme_commands()[1]
    assert test_command in ci_script.splitlines()


def first_screen_example() -> tuple[str, dict]:
    """The first screen's `$ curl ...` line and the answer printed under it."""
    text = (REPO_ROOT / "README.md").read_text()
    first_screen = text[: text.index("\n## ")]
    match = re.search(r"```console\n\$ (curl [^\n]+)\n(\{[^\n]+\})\n```", first_screen)
    assert match, "the first screen shows one real /predict call and its answer"
    return match.group(1), json.loads(match.group(2))


# Exact float32 backends agree with one another to float rounding; this bounds their logits' difference.
FLOAT32_LOGITS = 1e-4


@pytest.mark.server
@pytest.mark.isa
def test_the_first_screens_answer_is_what_the_shipped_model_answers_today(tmp_path):
    """The first screen shows the exact float32 backend's answer. The service may serve another backend on the
    CPU at hand (int8 where it verified that int8 keeps the accuracy, bf16...): then the live answer must lie
    within what that backend's verification measured, the largest logit difference from float32 (a bound
    over the images it was measured on; cat.png is a test image, so the shipped test-set report covers it)."""
    from tests.support.service import live_server

    command, shown = first_screen_example()
    # No APP_WEIGHTS and an empty state folder: the service's own default, as a fresh clone serves it.
    environment = {"APP_STATE_DIR": str(tmp_path / "state"), "APP_DEVICE": "cpu"}
    with live_server(tmp_path, environment) as server:
        answer, model = _answer_and_the_backend_that_gave_it(server.url, command)
    delta = _logit_bound(model)
    assert (answer["label"], answer["model_version"]) == (shown["label"], shown["model_version"])
    # The default service calibrates (APP_CALIBRATION=on) and flags: what the first screen shows is both.
    assert answer["in_distribution"] is shown["in_distribution"] is True
    # The energy score T*logsumexp(z/T) moves by at most the largest logit difference, whatever T.
    assert abs(answer["ood_score"] - shown["ood_score"]) <= delta
    # A calibrated probability softmax(z/T)_i moves by a factor of at most exp(2 delta / T).
    factor = math.exp(2 * delta / model["calibration"]["temperature"])
    for label, probability in shown["probabilities"].items():
        assert probability / factor - 1e-6 <= answer["probabilities"][label] <= probability * factor + 1e-6, label
    assert answer["confidence"] == answer["probabilities"][answer["label"]]
    ranked = sorted(answer["probabilities"], key=answer["probabilities"].get, reverse=True)
    assert [entry["label"] for entry in answer["top_k"]] == ranked[: len(shown["top_k"])]


def _answer_and_the_backend_that_gave_it(url: str, command: str) -> tuple[dict, dict]:
    """The README's call against ``url``, and GET /model from just before and after it: the service may swap
    in a verified backend at any moment, so the pair counts only if no swap came between."""
    for _ in range(3):
        before = httpx.get(f"{url}/model", timeout=30).json()
        result = subprocess.run(["bash", "-c", command.replace("http://127.0.0.1:8000", url)],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        after = httpx.get(f"{url}/model", timeout=30).json()
        if before["backend"] == after["backend"]:
            return json.loads(result.stdout), after
    raise AssertionError("the served backend changed during each of three calls")


def _logit_bound(model: dict) -> float:
    """How far the served backend's logits may be from float32's: float rounding for the exact backends,
    else the largest difference its verification measured."""
    backend = model["backend"]
    if backend in ("eager", "fused", "onnx"):
        return FLOAT32_LOGITS
    rows = {row["backend"]: row for row in (model["backend_verification"] or {}).get("backends", [])}
    assert backend in rows, f"{backend} serves without a verified row in /model: {model['backend_verification']}"
    assert rows[backend]["max_logit_diff"] is not None, f"{backend}'s report lacks max_logit_diff; measure again"
    return rows[backend]["max_logit_diff"] + FLOAT32_LOGITS


def test_the_readme_is_short_and_every_link_leads_somewhere():
    assert len((REPO_ROOT / "README.md").read_bytes()) <= MAX_BYTES
    for markdown in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")),
                     REPO_ROOT / "benchmarks" / "README.md"]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", markdown.read_text(encoding="utf-8")):
            assert (markdown.parent / target).exists(), f"{markdown.name} links to {target}, which does not exist"
