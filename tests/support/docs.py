"""Reading the project's Markdown, for the tests that keep the docs executable and in step with the code."""

from __future__ import annotations

import re

from tests.support import REPO_ROOT


def page(path: str) -> str:
    """A Markdown file by its path from the repository's root (``README.md``, ``docs/service.md``)."""
    return (REPO_ROOT / path).read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """From the line ``heading`` (``## Deploy with Docker``) to the next heading of the same level or higher;
    a ``#`` line inside a fenced code block (a shell comment) is not a heading."""
    level = len(heading.split(" ", 1)[0])
    lines = text.splitlines(keepends=True)
    start = next(index for index, line in enumerate(lines) if line.rstrip("\n") == heading)
    fenced = False
    for index in range(start + 1, len(lines)):
        line = lines[index]
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(rf"#{{1,{level}}} ", line):
            return "".join(lines[start:index])
    return "".join(lines[start:])


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.DOTALL)


def table_rows(text: str) -> list[list[str]]:
    """The cells of every table row but the header separators, stripped."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|[\s:|-]+\|", line):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows
