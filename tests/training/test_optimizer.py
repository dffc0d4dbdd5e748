import pytest
import torch

from model.architectures import build_model
from training.config import TrainingConfig
from training.optimizer import build_optimizer, build_scheduler, lr_factor


def test_batchnorm_parameters_and_biases_get_no_weight_decay():
    model = build_model("resnet18")
    optimizer = build_optimizer(model, TrainingConfig(data_dir="", weight_decay=5e-4))
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert groups["weights"]["weight_decay"] == 5e-4
    assert groups["norms_and_biases"]["weight_decay"] == 0.0
    undecayed = {id(p) for p in groups["norms_and_biases"]["params"]}
    decayed = {id(p) for p in groups["weights"]["params"]}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert {id(module.weight), id(module.bias)} <= undecayed, name
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            assert id(module.weight) in decayed, name
    assert id(model.fc.bias) in undecayed
    assert decayed.isdisjoint(undecayed)
    assert len(decayed) + len(undecayed) == len(list(model.parameters()))
    assert all(group["nesterov"] and group["momentum"] == 0.9 for group in optimizer.param_groups)


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_schedule_warms_up_to_the_peak_then_decays_to_zero(decay):
    config = TrainingConfig(data_dir="", epochs=10, warmup_epochs=2, lr=0.4, lr_decay=decay)
    optimizer = build_optimizer(build_model("resnet18"), config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=20)
    rates = []
    for _ in range(200):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warmup, decay_part = rates[:40], rates[40:]
    assert rates[0] == pytest.approx(0.4 / 40)
    assert all(a < b for a, b in zip(warmup, warmup[1:])), "warm-up rises every step"
    assert max(rates) == pytest.approx(0.4) and rates[39] == pytest.approx(0.4)
    assert all(a >= b for a, b in zip(decay_part, decay_part[1:])), "decay never rises"
    assert rates[-1] < 0.4 * 0.01
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_without_warmup_the_first_step_runs_at_the_peak():
    assert lr_factor(0, warmup_steps=0, total_steps=10, decay="linear") == 1.0
    assert lr_factor(10, warmup_steps=0, total_steps=10, decay="linear") == 0.0


def test_default_learning_rate_scales_linearly_with_the_batch():
    assert TrainingConfig(data_dir="", batch_size=512).lr == pytest.approx(0.4)
    assert TrainingConfig(data_dir="", batch_size=128).lr == pytest.approx(0.1)
    assert TrainingConfig(data_dir="", batch_size=512, lr=0.2).lr == 0.2
