"""Reading Compose files as Docker Compose does, without Docker: the YAML with Compose's own tags, and the
merge of several `-f` files (the rules of the Compose Specification, 13-merge.md), far enough for this
repository's files. Validation against the specification's JSON Schema lives in the tests."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support import REPO_ROOT

SCHEMA_PATH = Path(__file__).parent / "data" / "compose-spec.json"
COMPOSE_FILES = sorted(REPO_ROOT.glob("docker-compose*.yml"))

# Attributes whose value the later file replaces instead of appending to (13-merge.md, "Shell commands").
_REPLACED_SEQUENCES = {"command", "entrypoint", "test"}
# Sequences whose entries are unique by a key: a later entry with the same key replaces the earlier one.
_UNIQUE_BY_TARGET = {"volumes", "secrets", "configs"}


@dataclass(frozen=True)
class Reset:
    """`!reset VALUE`: remove the attribute from the merged model."""

    value: Any


@dataclass(frozen=True)
class Override:
    """`!override VALUE`: replace the attribute instead of merging into it."""

    value: Any


class ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus the `!reset` and `!override` tags Compose defines."""


def _tagged(wrapper: type) -> Any:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            return wrapper(loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return wrapper(loader.construct_sequence(node, deep=True))
        return wrapper(loader.construct_scalar(node) or None)

    return construct


ComposeLoader.add_constructor("!reset", _tagged(Reset))
ComposeLoader.add_constructor("!override", _tagged(Override))


def load(path: Path) -> dict[str, Any]:
    """One Compose file as written, `!reset`/`!override` values kept as `Reset`/`Override`."""
    with open(path, encoding="utf-8") as handle:
        return yaml.load(handle, Loader=ComposeLoader)


def untagged(node: Any) -> Any:
    """The file as the schema sees it: each tag's value in place of the tag."""
    if isinstance(node, (Reset, Override)):
        return untagged(node.value)
    if isinstance(node, dict):
        return {key: untagged(value) for key, value in node.items()}
    if isinstance(node, list):
        return [untagged(value) for value in node]
    return node


def _unique_key(attribute: str, entry: Any) -> Any:
    if attribute == "ports":
        return json.dumps(entry, sort_keys=True) if isinstance(entry, dict) else str(entry)
    if isinstance(entry, dict):
        return entry.get("target")
    # Short syntax, SOURCE:TARGET[:MODE]: the target is the second field.
    parts = str(entry).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def _merge_sequence(attribute: str, base: list[Any], override: list[Any]) -> list[Any]:
    if attribute in _REPLACED_SEQUENCES:
        return list(override)
    if attribute in _UNIQUE_BY_TARGET or attribute == "ports":
        merged = {_unique_key(attribute, entry): entry for entry in base}
        merged.update({_unique_key(attribute, entry): entry for entry in override})
        return list(merged.values())
    return base + override


def merge(base: Any, override: Any, attribute: str = "") -> Any:
    """`override` (a later -f file) merged onto `base`; a `Reset` removes the attribute (returns Reset)."""
    if isinstance(override, (Reset, Override)):
        return override if isinstance(override, Reset) else untagged(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            result = merge(base[key], value, key) if key in base else untagged(value)
            if isinstance(value, Reset) or isinstance(result, Reset):
                merged.pop(key, None)
            else:
                merged[key] = result
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return _merge_sequence(attribute, base, untagged(override))
    return untagged(override)


def project(*names: str) -> dict[str, Any]:
    """The application model of `docker compose -f NAME -f NAME ...`, files relative to the repository."""
    model: dict[str, Any] = {}
    for name in names:
        model = merge(model, load(REPO_ROOT / name))
    return model


def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


_INTERPOLATION = re.compile(r"^\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<rest>[^}]*)\}$")


def secret_value_problem(value: Any) -> str | None:
    """Why a secret's value in a Compose file is not acceptable, or None. Allowed: no value (taken from the
    shell or .env, or left unset), `${NAME}`, `${NAME:?message}` and `${NAME:-}` with an empty default."""
    if value is None:
        return None
    match = _INTERPOLATION.match(str(value))
    if match is None:
        return f"a literal value {value!r}"
    if match["op"] in (":-", "-", ":+", "+") and match["rest"]:
        return f"a default value in {value!r}"
    return None
