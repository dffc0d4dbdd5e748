import json

import pytest

from benchmarks.gpu.weights_parts import MANIFEST, join, split
from model.backend_report import report_file
from model.checkpoint import load_checkpoint


def test_split_then_join_restores_a_loadable_checkpoint(tmp_path, tiny_checkpoint):
    manifest = split(tiny_checkpoint, tmp_path / "parts", part_bytes=4 * 1024 * 1024)
    assert len(manifest["parts"]) == 11  # resnet18 float32 is ~44.7 MB
    assert all(part["bytes"] <= 4 * 1024 * 1024 for part in manifest["parts"])
    restored = join(tmp_path / "parts", tmp_path / "restored")
    assert load_checkpoint(restored).card == load_checkpoint(tiny_checkpoint).card


def test_join_refuses_a_damaged_part(tmp_path, tiny_checkpoint):
    manifest = split(tiny_checkpoint, tmp_path / "parts", part_bytes=16 * 1024 * 1024)
    damaged = tmp_path / "parts" / manifest["parts"][1]["name"]
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert (tmp_path / "parts" / MANIFEST).is_file()
    with pytest.raises(SystemExit, match="part1 has the wrong SHA-256"):
        join(tmp_path / "parts", tmp_path / "restored")


def test_join_writes_the_runs_cuda_backend_report_from_results(tmp_path, tiny_checkpoint):
    split(tiny_checkpoint, tmp_path / "parts")
    card = load_checkpoint(tiny_checkpoint).card
    report = {"format_version": 1, "weights_sha256": card.weights_sha256, "backends": []}
    (tmp_path / "parts" / "results.json").write_text(json.dumps({"backends": report}))
    restored = join(tmp_path / "parts", tmp_path / "restored")
    assert json.loads((restored / report_file("cuda")).read_text()) == report


@pytest.mark.parametrize("backends", [None, {"error": "JSONDecodeError: ..."}])
def test_join_writes_no_backend_report_when_the_run_had_none(tmp_path, tiny_checkpoint, backends):
    split(tiny_checkpoint, tmp_path / "parts")
    (tmp_path / "parts" / "results.json").write_text(json.dumps({"backends": backends}))
    restored = join(tmp_path / "parts", tmp_path / "restored")
    assert not (restored / report_file("cuda")).exists()
    assert load_checkpoint(restored).card == load_checkpoint(tiny_checkpoint).card
