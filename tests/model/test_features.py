import importlib.util

import pytest
import torch

from model.architectures import build_model
from model.features import GaussianStatistics, LogitsAndFeatures, joined, transform
from model.inference import available_cpu_backends, prepare_for_inference


@pytest.mark.parametrize("architecture", ["fastcnn", "resnet20", "resnet18"])
def test_forward_with_features_gives_the_forwards_logits_and_both_pooled_parts(architecture):
    torch.manual_seed(0)
    model = build_model(architecture).eval()
    batch = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, features = joined(model.forward_with_features(batch))
        assert torch.equal(logits, model(batch))
        assert torch.equal(features[:, -model.fc.in_features:], model.forward_features(batch))
    assert features.shape[1] > model.fc.in_features, "the first stage's averages come first"


def test_the_statistics_score_is_minus_the_squared_mahalanobis_distance_and_survive_safetensors():
    values = torch.randn(500, 4, generator=torch.Generator().manual_seed(1)) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    statistics = GaussianStatistics.from_bytes(GaussianStatistics.fit(values, ridge=0.0).to_bytes())
    centred = values[:3] - values.mean(0)
    covariance = (values - values.mean(0)).T @ (values - values.mean(0)) / len(values)
    expected = -torch.einsum("nd,de,ne->n", centred, torch.linalg.inv(covariance), centred)
    assert statistics.score(values[:3]) == pytest.approx(expected, rel=1e-4)
    far = values.mean(0, keepdim=True) + 10 * values.std(0)
    assert statistics.score(far) < statistics.score(values).min()


def test_the_transforms():
    values = torch.tensor([[-1.0, 0.0, 3.0]])
    assert transform(values, "log") == pytest.approx(torch.log(torch.tensor([[0.1, 0.1, 3.1]])))
    assert float(transform(values, "l2").norm()) == pytest.approx(1.0)


@pytest.mark.parametrize("backend", ["eager", "fused", "bf16", "int8", "onnx"])
def test_every_cpu_backend_returns_the_same_logits_with_the_features(backend):
    if backend not in available_cpu_backends()[0] or (backend == "onnx" and not importlib.util.find_spec("onnx")):
        pytest.skip(f"{backend} is not available here")
    torch.manual_seed(0)
    model = build_model("fastcnn").eval()
    model.initialize_from_data(torch.randn(64, 3, 32, 32))
    batch, calibration = torch.randn(8, 3, 32, 32), torch.randn(32, 3, 32, 32)
    with torch.inference_mode():
        reference_logits, reference_features = joined(LogitsAndFeatures(model)(batch))
        plain = prepare_for_inference(model, "cpu", backend, calibration)(batch)
        prepared = prepare_for_inference(model, "cpu", backend, calibration, with_features=True)
        logits, features = joined(prepared(batch))
    # int8 observes the features' ranges too, so its rounding may differ a little; every other backend's
    # logits are those it gives without the features.
    tolerance = {"int8": 0.5, "bf16": 0.1}.get(backend, 1e-4)
    assert logits == pytest.approx(plain, abs=0.1 if backend == "int8" else 1e-6)
    assert logits == pytest.approx(reference_logits, abs=tolerance)
    assert features.shape == reference_features.shape
    assert features == pytest.approx(reference_features, abs=tolerance * 4, rel=0.05)
