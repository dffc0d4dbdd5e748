"""The builder stage's two pip steps, run here on exactly the files .dockerignore lets into the context:
the dependency list it reads from pyproject.toml, and the wheel `pip install --no-deps .` builds, which must
hold every package and the web page, and nothing .dockerignore means to keep out."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.deploy.dockerfile_model import REPO_ROOT, dockerignore_rules, in_build_context, instructions


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the build context: the checkout's files (tracked, or new and not git-ignored) that
    .dockerignore lets in."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    rules = dockerignore_rules()
    destination = tmp_path_factory.mktemp("context")
    for relative in filter(None, listed):
        source = REPO_ROOT / relative
        if source.is_file() and in_build_context(relative, rules):
            (destination / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / relative)
    return destination


def _builder_python_command() -> list[str]:
    """The `python -c ...` that writes requirements.txt, from the builder stage's RUN."""
    (run,) = [i.arguments for i in instructions() if i.keyword == "RUN" and "tomllib" in i.arguments]
    words = shlex.split(run)
    start = words.index("python")
    return words[start:words.index(">", start)]


def test_the_dependency_step_installs_what_pyproject_declares(context: Path) -> None:
    command = _builder_python_command()
    command[0] = sys.executable
    listed = subprocess.run(command, cwd=context, capture_output=True, text=True, check=True).stdout
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    assert listed.splitlines() == declared


def test_the_context_builds_a_wheel_with_every_package(context: Path, tmp_path: Path) -> None:
    source = shutil.copytree(context, tmp_path / "src")  # building writes build/ and *.egg-info
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(tmp_path), "."],
        cwd=source, capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = tmp_path.glob("cifar_serve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {name.split("/")[0] for name in names if name.endswith("/__init__.py")}
    expected = {p.name for p in REPO_ROOT.iterdir() if p.name in ("app", "model", "training")}
    assert expected <= packages, f"missing from the image: {expected - packages}"
    assert "app/static/index.html" in names
    assert not any(name.startswith(("tests/", "weights/")) for name in names)


def test_the_context_holds_no_local_state(context: Path) -> None:
    top_level = {path.name for path in context.iterdir()}
    assert top_level <= {"pyproject.toml", "README.md", "app", "model", "training", "weights", "examples"}, top_level
