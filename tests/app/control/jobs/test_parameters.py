"""TrainParams, the body of POST /train, derived from training's own parameters: the job API offers each one a
job may set, a recipe's defaults fill what a body leaves out, and the command line the runner builds from a
job parses back to the configuration the job asked for. (Tests may import both app and training.)"""

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.control.jobs.parameters import TrainParams
from app.control.jobs.runner import TrainingCommand
from training.cli import parse_command
from training.config import DEFAULTS, RECIPES

SET_BY_THE_SERVICE = {"data_dir", "device", "download", "skip_integrity_check"}


def test_a_job_sets_every_training_parameter_but_where_the_data_is_and_which_device() -> None:
    offered = set(TrainParams.model_fields) - {"gpus"}
    assert offered.isdisjoint(SET_BY_THE_SERVICE)
    assert offered | SET_BY_THE_SERVICE == set(DEFAULTS.to_dict())
    assert {"recipe", "precision", "norm_lr_scale"} <= offered


def test_a_recipe_fills_the_fields_the_body_leaves_out() -> None:
    params = TrainParams.model_validate({"recipe": "cpu", "epochs": 30})
    assert params.epochs == 30
    for name, value in RECIPES["cpu"].items():
        if name != "epochs":
            assert getattr(params, name) == value, name
    assert TrainParams().model_dump(exclude={"gpus"}) == {
        name: value for name, value in DEFAULTS.to_dict().items() if name not in SET_BY_THE_SERVICE
    } | {"lr": None}


@pytest.mark.parametrize("params", [
    TrainParams(),
    TrainParams(arch="resnet18", epochs=3, batch_size=16, lr=0.01, weight_decay=0, label_smoothing=0.2,
                warmup_epochs=0.5, lr_decay="cosine", cutout=8, ema=True, tta=False, compile=True,
                deterministic=True, seed=7, checkpoint_every=2, eval_every=1, train_limit=64, test_limit=32,
                holdout=8, plots=False, verify_backends=False, weights_dtype="float16"),
    TrainParams(arch="resnet20", epochs=4),
    TrainParams(arch="fastcnn", epochs=4, warmup_epochs=1),
    TrainParams(recipe="cpu", epochs=6),
    TrainParams(precision="fp32", norm_lr_scale=2.0, momentum=0.8, zero_init_residual=False, ema_decay=0.99),
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


@pytest.mark.parametrize("body", [{"verify_backends": 0}, {"epochs": "3"}, {"tta": "true"}])
def test_values_of_the_wrong_json_type_are_refused_not_coerced(body):
    with pytest.raises(ValidationError):
        TrainParams.model_validate(body)
