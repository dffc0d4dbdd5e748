"""Reading the project's Markdown, for the tests that keep the docs executable and in step with the code."""

from __future__ import annotations

import re

from tests.support import REPO_ROOT


def page(path: str) -> str:
    """A Markdown file by its path from the repository's root (``README.md``, ``docs/service.md``)."""
    return (REPO_ROOT / path).read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """From the line ``heading`` (``## Deploy with Docker``) to the next heading of the same level or higher."""
    level = heading.split(" ", 1)[0]
    start = text.index(f"\n{heading}\n") + 1
    ends = [match.start() for match in re.finditer(rf"^#{{1,{len(level)}}} ", text[start + 1:], re.MULTILINE)]
    return text[start: start + 1 + ends[0]] if ends else text[start:]


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.DOTALL)


def table_rows(text: str) -> list[list[str]]:
    """The cells of every table row but the header separators, stripped."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|[\s:|-]+\|", line):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows
