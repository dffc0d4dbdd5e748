import json

import pytest

from training.cli import parse_command
from training.config import RECIPES, TrainingConfig, write_config
from training.layout import CONFIG_FILE


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as raised:
        parse_command(argv)
    assert raised.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_defaults_resolve_to_the_documented_recipe(tmp_path):
    command = parse_command(["--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run")])
    config = command.config
    assert (config.arch, config.epochs, config.batch_size) == ("resnet50", 35, 512)
    assert config.lr == pytest.approx(0.4) and config.label_smoothing == 0.1 and config.weight_decay == 5e-4
    assert config.tta and not config.ema and not config.compile
    assert config.recipe == "gpu" and config.precision == "auto" and config.holdout == 0
    assert not command.resume and not command.eval_only


def test_the_cpu_recipe_changes_the_defaults_and_options_still_override_it(tmp_path):
    base = ["--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run"), "--recipe", "cpu"]
    config = parse_command(base).config
    assert config.recipe == "cpu"
    for name, value in RECIPES["cpu"].items():
        assert getattr(config, name) == value, name
    assert config.arch == "fastcnn" and config.holdout > 0, "tuned on a holdout, never on the test set"
    overridden = parse_command([*base, "--epochs", "6", "--arch", "resnet20"]).config
    assert (overridden.epochs, overridden.arch, overridden.lr) == (6, "resnet20", RECIPES["cpu"]["lr"])
    assert parse_command([*base[:4], "--epochs", "3"]).config.arch == "resnet50", "no recipe: the GPU one"


def test_help_shows_the_chosen_recipes_defaults(capsys, tmp_path):
    with pytest.raises(SystemExit):
        parse_command(["--recipe", "cpu", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"training epochs (default {RECIPES['cpu']['epochs']})" in help_text
    assert "network (default fastcnn)" in help_text


def test_an_unknown_recipe_is_a_one_line_usage_error(capsys, tmp_path):
    assert "--recipe" in _usage_error(capsys, ["--recipe", "tpu", "--data-dir", str(tmp_path)])


def test_a_resumed_cpu_run_keeps_its_recipe_without_repeating_it(tmp_path):
    stored = parse_command(["--data-dir", str(tmp_path), "--run-dir", str(tmp_path), "--recipe", "cpu"]).config
    write_config(tmp_path, stored, git_commit=None)
    assert parse_command(["--resume", "--run-dir", str(tmp_path)]).config == stored


@pytest.mark.parametrize("argv, fragment", [
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "1"], "--batch-size"),
    (["--lr", "-0.1"], "--lr"),
    (["--label-smoothing", "1"], "--label-smoothing"),
    (["--device", "gpu"], "--device"),
    (["--warmup-epochs", "50"], "--warmup-epochs"),
    (["--cutout", "40"], "--cutout"),
    (["--precision", "fp16"], "--precision"),
    (["--norm-lr-scale", "0"], "--norm-lr-scale"),
    (["--weights", "x"], "--eval-only"),
])
def test_bad_options_are_one_line_usage_errors(capsys, tmp_path, argv, fragment):
    line = _usage_error(capsys, ["--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run"), *argv])
    assert fragment in line


def test_run_dir_is_required_for_training(capsys, tmp_path):
    assert "--run-dir" in _usage_error(capsys, ["--data-dir", str(tmp_path)])


def test_a_new_run_refuses_a_run_dir_that_holds_a_run(capsys, tmp_path):
    (tmp_path / "state.pt").write_bytes(b"")
    assert "--resume" in _usage_error(capsys, ["--data-dir", str(tmp_path), "--run-dir", str(tmp_path)])


def test_resume_reads_the_stored_configuration(tmp_path):
    stored = TrainingConfig(data_dir=str(tmp_path), epochs=7, arch="resnet18", batch_size=64)
    write_config(tmp_path, stored, git_commit=None)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["config"]["lr"] == pytest.approx(0.05)
    command = parse_command(["--resume", "--run-dir", str(tmp_path), "--epochs", "7"])
    assert command.resume and command.config == stored


def test_resume_refuses_an_option_that_contradicts_the_stored_one(capsys, tmp_path):
    write_config(tmp_path, TrainingConfig(data_dir=str(tmp_path), epochs=7), git_commit=None)
    line = _usage_error(capsys, ["--resume", "--run-dir", str(tmp_path), "--epochs", "9"])
    assert "--epochs 9" in line and "7" in line


def test_resume_without_a_run_is_a_usage_error(capsys, tmp_path):
    assert "config.json" in _usage_error(capsys, ["--resume", "--run-dir", str(tmp_path)])
