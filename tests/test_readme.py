"""The README's first screen is what a new user and CI run; keep it executable and in step with CI."""

import re

from tests.support import REPO_ROOT


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
