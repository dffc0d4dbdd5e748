"""benchmarks/README.md shows measured figures only: every table names the JSON it comes from, and every
figure in it (but the ratios the page derives from them) is in that JSON."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from tests.support import REPO_ROOT
from tests.support.docs import page

RESULTS = REPO_ROOT / "benchmarks" / "results"
DERIVED = ("×", "÷", "vs ")  # column headers of ratios the page computes from two figures
NOT_FIGURES = ("machine", "command", "server", "backend")  # text columns: versions, flags, names


def figures(node: Any) -> list[float]:
    if isinstance(node, bool) or node is None or isinstance(node, str):
        return []
    if isinstance(node, (int, float)):
        return [float(node)]
    values = node.values() if isinstance(node, dict) else node
    return [figure for value in values for figure in figures(value)]


def found(token: str, measured: list[float]) -> bool:
    percent, text = token.endswith("%"), token.rstrip("%")
    value = float(text)
    if "e" in text:  # 5.4e-07: two significant figures
        return any(math.isclose(x * (100 if percent else 1), value, rel_tol=0.06) for x in measured)
    decimals = len(text.split(".")[1])
    return any(abs(x * (100 if percent else 1) - value) <= 0.5 * 10 ** -decimals + 1e-9 for x in measured)


def tables() -> list[tuple[str, list[str], list[list[str]]]]:
    """(JSON file named last before the table, as a path inside benchmarks/results, header, rows) for each
    table of the page."""
    found_tables, source, header, rows = [], None, None, []
    for line in page("benchmarks/README.md").splitlines() + [""]:
        if line.startswith("|"):
            cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
            if header is None:
                header = cells
            elif not re.fullmatch(r"\|[\s:|-]+\|", line):
                rows.append(cells)
            continue
        if header is not None:
            found_tables.append((source, header, rows))
            header, rows = None, []
        if named := re.findall(r"([\w./-]+\.json)", line):
            source = named[-1].removeprefix("benchmarks/results/")
    return found_tables


def test_every_result_is_shown_and_every_table_names_its_result():
    text = page("benchmarks/README.md")
    assert {path.name for path in RESULTS.glob("*.json")} <= set(re.findall(r"[\w.-]+\.json", text))
    for source, header, _ in tables():
        assert source is not None and (RESULTS / source).is_file(), f"the table {header} names no result file"


def test_every_figure_in_a_table_is_in_its_result():
    for source, header, rows in tables():
        measured = figures(json.loads((RESULTS / source).read_text()))
        for row in rows:
            for column, cell in zip(header, row):
                if any(mark in column for mark in DERIVED) or column.lower() in NOT_FIGURES:
                    continue
                for token in re.findall(r"\d+\.\d+(?:e-?\d+)?%?", cell):
                    assert found(token, measured), f"{token} ({column}) is not in {source}: {row}"
