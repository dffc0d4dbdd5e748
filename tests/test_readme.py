"""The README's first screen is what a new user and CI run; keep it executable, in step with CI, short, and
its links (and those of docs/ and benchmarks/README.md) pointing at files that exist."""

import json
import re
import subprocess

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


@pytest.mark.server
def test_the_first_screens_answer_is_what_the_shipped_model_answers_today(tmp_path):
    from tests.support.service import live_server

    command, shown = first_screen_example()
    # No APP_WEIGHTS and an empty state folder: the service's own default, as a fresh clone serves it.
    environment = {"APP_STATE_DIR": str(tmp_path / "state"), "APP_DEVICE": "cpu"}
    with live_server(tmp_path, environment) as server:
        result = subprocess.run(["bash", "-c", command.replace("http://127.0.0.1:8000", server.url)],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    answer = json.loads(result.stdout)
    assert (answer["label"], answer["model_version"]) == (shown["label"], shown["model_version"])
    assert answer["confidence"] == pytest.approx(shown["confidence"], abs=1e-4)
    assert [entry["label"] for entry in answer["top_k"]] == [entry["label"] for entry in shown["top_k"]]
    # The default service calibrates (APP_CALIBRATION=on) and flags: what the first screen shows is both.
    assert answer["in_distribution"] is shown["in_distribution"] is True
    assert answer["ood_score"] == pytest.approx(shown["ood_score"], abs=1e-3)
    assert answer["probabilities"] == pytest.approx(shown["probabilities"], abs=1e-4)


def test_the_readme_is_short_and_every_link_leads_somewhere():
    assert len((REPO_ROOT / "README.md").read_bytes()) <= MAX_BYTES
    for markdown in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")),
                     REPO_ROOT / "benchmarks" / "README.md"]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", markdown.read_text(encoding="utf-8")):
            assert (markdown.parent / target).exists(), f"{markdown.name} links to {target}, which does not exist"
