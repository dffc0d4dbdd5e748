"""docs/deploy-kubernetes.md stays executable: the directories it applies exist, the routes its curl
commands call are the service's, its YAML parses, the storage-class patch it shows does what it says, and
its canary, promote and rollback patches give an InferenceService that KServe's schema accepts."""

from __future__ import annotations

import json
import os
import re
import shlex
import textwrap
from pathlib import Path

import yaml

from app.config import Settings
from tests.deploy.kubernetes_model import (
    KSERVE_DIR,
    KUBERNETES_DIR,
    REPO_ROOT,
    crd_errors,
    find,
    load_file,
    merge_patch,
    render,
)
from tests.support import docs

DOC = REPO_ROOT / "docs" / "deploy-kubernetes.md"
TEXT = DOC.read_text(encoding="utf-8")


def _blocks(language: str) -> list[str]:
    """The fenced blocks of a language, list items' indented ones included, dedented."""
    return [textwrap.dedent(block) for block in
            re.findall(rf"^ *```{language}\n(.+?)\n *```$", TEXT, flags=re.S | re.M)]


def _commands() -> list[list[str]]:
    """Each shell command of the bash blocks and of inline `code`, continuation lines joined."""
    lines = [line for block in _blocks("bash") for line in block.replace("\\\n", " ").splitlines()]
    lines += [code.replace("\n", " ") for code in re.findall(r"`(kubectl [^`]+)`", TEXT)]
    commands = []
    for line in lines:
        line = line.split(" # ")[0].strip().rstrip("&").strip()
        if line:
            commands.append(shlex.split(line, comments=True))
    return commands


def test_the_deploy_page_links_the_page_and_says_how_training_runs_on_kubernetes() -> None:
    section = docs.section(docs.page("docs/deploy.md"), "## Deploy on Kubernetes")
    assert "(deploy-kubernetes.md)" in section
    assert "kubectl apply -k deploy/kubernetes/overlays/gpu" in section
    assert "Kubernetes Job" in section and "process" in section


def test_every_applied_directory_is_a_kustomization() -> None:
    applied = [c[c.index("-k") + 1] for c in _commands() if c[:2] == ["kubectl", "apply"] and "-k" in c[:-1]]
    assert "deploy/kubernetes/overlays/gpu" in applied
    assert {f"deploy/kubernetes/training/{nodes}" for nodes in ("single-node", "multi-node")} <= set(applied)
    assert "deploy/kserve" in applied
    for directory in applied:
        assert (REPO_ROOT / directory / "kustomization.yaml").is_file(), directory


def test_every_file_the_page_names_exists() -> None:
    for name in set(re.findall(r"`((?:deploy|tests|app|docs)/[\w./*-]+)`", TEXT)):
        assert list(REPO_ROOT.glob(name)), name


def test_every_route_the_curl_commands_call_is_the_services() -> None:
    from app.factory import create_app

    templates = [re.sub(r"\\{[^/]+\\}", "[^/]+", re.escape(path))
                 for path in create_app(Settings()).openapi()["paths"]]
    called = [re.sub(r"\?.*", "", url) for url in re.findall(r"http://localhost:800[01](/[^\s\"']*)", TEXT)]
    assert len(called) >= 5
    for path in called:
        assert any(re.fullmatch(template, path) for template in templates), path


def test_every_yaml_block_parses() -> None:
    for block in _blocks("yaml"):
        assert yaml.safe_load(block) is not None


def test_the_storage_class_patch_names_a_class_for_exactly_the_shared_claims(tmp_path: Path) -> None:
    (snippet,) = [b for b in _blocks("yaml") if "storageClassName" in b]
    patches = [p for p in yaml.safe_load(snippet)["patches"] if "target" in p]
    overlay_dir = os.path.relpath(KUBERNETES_DIR / "overlays" / "gpu", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({"resources": [overlay_dir], "patches": patches}))
    claims = find(render(str(tmp_path)), "PersistentVolumeClaim")
    assert len(claims) == 4
    for claim in claims:
        shared = claim["spec"]["accessModes"] == ["ReadWriteMany"]
        assert ("storageClassName" in claim["spec"]) == shared, claim["metadata"]["name"]


def _isvc_patches() -> list[dict]:
    patches = []
    for command in _commands():
        if command[:2] == ["kubectl", "-n"] and "patch" in command and "inferenceservice" in command:
            assert command[command.index("--type") + 1] == "merge"
            patches.append(json.loads(command[command.index("-p") + 1]))
    return patches


def test_the_canary_promote_and_rollback_patches_give_valid_inference_services() -> None:
    (service,) = [r for r in load_file(KSERVE_DIR / "inferenceservice.yaml") if r["kind"] == "InferenceService"]
    patches = _isvc_patches()
    percents = [p["spec"]["predictor"].get("canaryTrafficPercent") for p in patches]
    assert percents == [10, 100, 0], "a canary, its promotion and its rollback"
    patched = service
    for patch in patches:
        patched = merge_patch(patched, patch)
        assert crd_errors(patched) == [], patch
    canary_uri = patches[0]["spec"]["predictor"]["model"]["storageUri"]
    assert canary_uri != service["spec"]["predictor"]["model"]["storageUri"], "a canary serves another version"
    assert canary_uri.startswith("pvc://cifar-serve-registry/versions/")
