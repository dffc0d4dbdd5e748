"""TrainParams against the training module's own command line: same defaults, and every flag it emits parses
to the configuration the job asked for. (Tests may import both app and training; the packages never do.)"""

from dataclasses import fields
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.jobs.runner import TrainingCommand
from app.jobs.schemas import TrainParams
from training.config import DEFAULTS, TrainingConfig, parse_command


def test_defaults_are_the_training_modules() -> None:
    training_defaults = {field.name: field.default for field in fields(TrainingConfig)}
    for name, field in TrainParams.model_fields.items():
        if name != "gpus":
            assert training_defaults[name] == field.default, name


@pytest.mark.parametrize("params", [
    TrainParams(),
    TrainParams(arch="resnet18", epochs=3, batch_size=16, lr=0.01, weight_decay=0, label_smoothing=0.2,
                warmup_epochs=0.5, lr_decay="cosine", cutout=8, ema=True, tta=False, compile=True,
                deterministic=True, seed=7, checkpoint_every=2, eval_every=1, train_limit=64, test_limit=32,
                holdout=8, plots=False, verify_backends=False, weights_dtype="float16"),
    TrainParams(arch="resnet20", epochs=4),
    TrainParams(arch="fastcnn", epochs=4, warmup_epochs=1),
])
def test_the_command_line_parses_to_the_requested_configuration(params: TrainParams, tmp_path: Path) -> None:
    command = TrainingCommand(data_dir=tmp_path, skip_integrity_check=True, device="cpu")
    argv = command.start(params, tmp_path / "run")
    config = parse_command(argv[3:]).config
    for name, value in params.model_dump(exclude={"gpus"}).items():
        expected = DEFAULTS.peak_lr * params.batch_size / DEFAULTS.batch_size if name == "lr" and value is None \
            else value
        assert getattr(config, name) == pytest.approx(expected) if isinstance(expected, float) \
            else getattr(config, name) == expected, name
    assert config.skip_integrity_check and config.device == "cpu" and config.data_dir == str(tmp_path)


@pytest.mark.parametrize(("body", "field"), [
    ({"epochs": 0}, "epochs"), ({"batch_size": 1}, "batch_size"), ({"lr": -1}, "lr"),
    ({"arch": "vgg"}, "arch"), ({"epochs": 1}, "warmup_epochs"), ({"gpus": 0}, "gpus"),
    ({"weights_dtype": "int8"}, "weights_dtype"), ({"epoch": 3}, "epoch"), ({"cutout": 40}, "cutout"),
    ({"batch_size": 100, "gpus": 3}, "gpus"),
])
def test_impossible_values_name_their_field(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as error:
        TrainParams.model_validate(body)
    assert [e["loc"] for e in error.value.errors()] == [(field,)]
