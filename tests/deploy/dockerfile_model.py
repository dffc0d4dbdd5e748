"""Reading the Dockerfile and .dockerignore as Docker does, without Docker, far enough for the tests: the
instructions of each stage, and whether a path is sent in the build context."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support import REPO_ROOT


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, CMD, ...
    arguments: str  # the rest of the logical line, continuation lines joined

    def exec_form(self) -> list[str] | None:
        """The JSON-array (exec) form's list, or None for the shell form."""
        text = self.arguments.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def instructions(path: Path = REPO_ROOT / "Dockerfile") -> list[Instruction]:
    """The Dockerfile's instructions in order; comments dropped, `\\` continuations joined."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    if pending:
        logical.append(pending)
    result = []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        result.append(Instruction(keyword.upper(), arguments.strip()))
    return result


def final_stage(path: Path = REPO_ROOT / "Dockerfile") -> list[Instruction]:
    """The instructions of the last stage, the one `docker build` tags and runs."""
    body = instructions(path)
    start = max(i for i, instruction in enumerate(body) if instruction.keyword == "FROM")
    return body[start:]


def env(stage: list[Instruction]) -> dict[str, str]:
    """The stage's ENV values (KEY=VALUE form)."""
    values: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword == "ENV":
            for item in shlex.split(instruction.arguments):
                key, _, value = item.partition("=")
                values[key] = value
    return values


def container_command(stage: list[Instruction]) -> list[str]:
    """What `docker run IMAGE` executes: the ENTRYPOINT's list followed by the CMD's (exec forms)."""
    command: list[str] = []
    for keyword in ("ENTRYPOINT", "CMD"):
        for instruction in (i for i in stage if i.keyword == keyword):
            value = instruction.exec_form()
            assert value is not None, f"{keyword} must use the exec form, so that signals reach the server"
            command += value
    return command


def healthcheck_command(stage: list[Instruction]) -> list[str]:
    """The exec-form command of the stage's HEALTHCHECK (after its --options and CMD)."""
    (instruction,) = [i for i in stage if i.keyword == "HEALTHCHECK"]
    _, _, command = instruction.arguments.partition(" CMD ")
    value = json.loads(command)
    assert isinstance(value, list), "HEALTHCHECK CMD must use the exec (JSON array) form"
    return value


def run_healthcheck(port: int, command: list[str] | None = None) -> int:
    """Exit status of the image's HEALTHCHECK command (or ``command``, such as a compose file's), with
    `python` this interpreter and the port moved."""
    command = command or healthcheck_command(final_stage())
    command = [sys.executable if part == "python" else part.replace(":8000/", f":{port}/") for part in command]
    return subprocess.run(command, capture_output=True, timeout=30).returncode


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore pattern syntax (Go's filepath.Match plus `**`) as a regular expression."""
    out = ""
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1:end].replace("!", "^", 1) + "]"
            i = end
        else:
            out += re.escape(char)
        i += 1
    return re.compile(out + r"\Z")


def dockerignore_rules(path: Path = REPO_ROOT / ".dockerignore") -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes, pattern) for each rule, in order; `!` rules re-include."""
    rules = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = line[1:].strip() if include else line
        pattern = pattern.strip("/").removeprefix("./")
        rules.append((not include, _pattern_regex(pattern)))
    return rules


def in_build_context(relative_path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker sends the path: the last rule matching it or one of its parent folders decides."""
    parts = relative_path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for excludes, pattern in rules:
        if any(pattern.match(candidate) for candidate in candidates):
            excluded = excludes
    return not excluded
