"""Diagnostics: per-layer distance to the start and feature R^2, on hand-built models with known answers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import RandomImages, tiny_timm_cnn
from torch import nn

from hf_sp import SPConfig, SPTrainer
from hf_sp.diagnostics import (
    anchors_from_optimizer,
    default_feature_layers,
    feature_r2,
    plot_diagnostics,
    r2_score,
    recalibrate_batchnorm,
    relative_distances,
    relative_distances_from_optimizer,
    total_distance,
)


class Scale(nn.Module):
    """y = a * x on 1-channel inputs, with a hook-able inner layer."""

    def __init__(self, a: float):
        super().__init__()
        self.inner = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.inner.weight.fill_(a)

    def forward(self, x):
        return self.inner(x)


def test_identical_weights_are_at_distance_zero():
    model = tiny_timm_cnn()
    state = model.state_dict()
    distances = relative_distances(state, copy.deepcopy(state))
    assert distances and all(d == 0.0 for d in distances.values())
    names = [n for n, p in model.named_parameters()]
    assert total_distance(state, state, names) == (0.0, 0.0)


def test_relative_distance_on_a_constructed_example():
    before = {"w": torch.ones(2, 2), "b": torch.zeros(3)}  # ||w0|| = 2
    after = {"w": torch.tensor([[1.0, 2.0], [1.0, 1.0]]), "b": torch.zeros(3)}
    distances = relative_distances(before, after)
    assert distances == {"w": 0.5, "b": 0.0}  # ||w - w0|| = 1; a zero start that did not move stays at 0
    assert relative_distances({"b": torch.zeros(2)}, {"b": torch.ones(2)})["b"] == math.inf
    dist, rel = total_distance(before, after, ["w", "b"])
    assert dist == 1.0 and rel == 0.5
    with pytest.raises(ValueError, match="'x' is missing"):
        relative_distances(before, after, ["x"])
    with pytest.raises(ValueError, match="shape"):
        relative_distances({"w": torch.ones(2)}, {"w": torch.ones(3)}, ["w"])


def test_identical_models_have_feature_r2_one():
    model = tiny_timm_cnn()
    x = torch.randn(4, 3, 16, 16)
    layers = default_feature_layers(model)
    assert layers[-1] == "global_pool" and len(layers) >= 3
    for method in ("identity", "linear"):
        r2 = feature_r2(model, copy.deepcopy(model), x, method=method)
        assert set(r2) == set(layers)
        for layer, value in r2.items():
            if not math.isnan(value):  # linear R^2 is undefined with fewer rows than channels
                assert value == pytest.approx(1.0, abs=1e-9), layer
    assert model.training  # the train/eval flag is restored


def test_feature_r2_on_a_constructed_example():
    # features before: x = [1, 2, 3]; after: 2x = [2, 4, 6], mean 4 -> SST = 8, SSE(identity) = 1 + 4 + 9 = 14
    x = torch.tensor([[1.0], [2.0], [3.0]])
    identity = feature_r2(Scale(1.0), Scale(2.0), x, layers=["inner"])
    assert identity == {"inner": pytest.approx(1 - 14 / 8)}
    # a linear map of the source features explains the fine-tuned ones exactly
    assert feature_r2(Scale(1.0), Scale(2.0), x, layers=["inner"], method="linear")["inner"] == pytest.approx(1.0)
    # shifted features: identity R^2 = 1 - 3 * 1 / 2 (SST of [1, 2, 3] is 2)
    assert r2_score(x, x + 1) == pytest.approx(1 - 3 / 2)
    with pytest.raises(ValueError, match="method"):
        r2_score(x, x, method="cosine")
    with pytest.raises(ValueError, match="not modules"):
        feature_r2(Scale(1.0), Scale(2.0), x, layers=["nope"])


def _l2_sp_args(output_dir, max_steps: int) -> SPConfig:
    """A few SGD steps of l2_sp on CPU, nothing saved."""
    return SPConfig(
        output_dir=str(output_dir),
        sp_penalty="l2_sp",
        sp_alpha=0.1,
        learning_rate=0.05,
        optim="sgd",
        max_steps=max_steps,
        per_device_train_batch_size=8,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )


def test_distances_from_the_optimizer_anchors_match_the_state_dicts(tmp_path):
    model = tiny_timm_cnn()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    args = _l2_sp_args(tmp_path, max_steps=3)
    trainer = SPTrainer(model=model, args=args, train_dataset=RandomImages(n=16, size=32))
    trainer.train()
    pairs = anchors_from_optimizer(trainer.optimizer)
    assert pairs and all(n.startswith("timm_model.") for n in pairs)
    from_optimizer = relative_distances_from_optimizer(trainer.optimizer)
    after = trainer.model.timm_model.state_dict()
    from_states = relative_distances(start, after, [n.removeprefix("timm_model.") for n in pairs])
    assert list(from_states.values()) == pytest.approx(list(from_optimizer.values()), rel=1e-6)
    assert max(from_optimizer.values()) > 0
    # the total matches the regularizer's own distance
    dist, rel = trainer.sp_regularizer.distance(trainer.optimizer.optimizer)
    total = total_distance(start, after, [n.removeprefix("timm_model.") for n in pairs])
    assert total == pytest.approx((dist, rel), rel=1e-5)


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_diagnostics(
        {"L2": {"a.weight": 0.1, "b.weight": 0.2}, "L2-SP": {"a.weight": 0.01, "b.weight": 0.02}},
        {"L2": {"a": 0.5, "b": 0.1}, "L2-SP": {"a": 0.9, "b": 0.8}},
        tmp_path / "d.png",
        title="t",
    )
    assert path.is_file() and path.stat().st_size > 1000


def test_recalibrated_batchnorm_statistics_are_the_average_over_the_given_images():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2)
    ).double()
    model.train()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(10, 3, 8, 8, dtype=torch.float64) * 3 + 1
    recalibrated = recalibrate_batchnorm(model, x, batch_size=4)  # batches of 4, 4 and 2 images
    bn_input = model[0](x)
    bn = recalibrated[1]
    # the average of the per-batch statistics, each weighted equally (momentum=None)
    batches = bn_input.split(4)
    mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    var = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)
    assert not recalibrated.training
    for name, value in before.items():  # the source model is untouched, the weights are shared values
        assert torch.equal(model.state_dict()[name], value), name
        if not name.startswith("1.running") and not name.endswith("num_batches_tracked"):
            assert torch.equal(recalibrated.state_dict()[name], value), name
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        recalibrate_batchnorm(nn.Sequential(nn.Linear(2, 2)), torch.zeros(1, 2))


def test_the_readme_diagnostics_snippet(tmp_path):
    """The README's recipe on a tiny timm CNN: copy before training, distances, R^2, BatchNorm reference, plot."""
    pytest.importorskip("matplotlib")
    args = _l2_sp_args(tmp_path / "out", max_steps=2)
    train_ds = RandomImages(n=16, size=32)
    trainer = SPTrainer(model=tiny_timm_cnn(), args=args, train_dataset=train_ds)
    source_model = copy.deepcopy(trainer.model)
    trainer.train()
    distance = relative_distances_from_optimizer(trainer.optimizer)
    pixel_values, train_pixel_values = RandomImages(n=8, size=32, seed=1).x, train_ds.x
    r2 = feature_r2(source_model, trainer.model, pixel_values)
    r2_bn = feature_r2(source_model, recalibrate_batchnorm(source_model, train_pixel_values), pixel_values)
    path = plot_diagnostics({"L2-SP": distance}, {"L2-SP": r2, "w0, BN": r2_bn}, tmp_path / "diagnostics.png")
    assert path.stat().st_size > 1000
    assert r2.keys() == r2_bn.keys() and all(v < 1 for v in r2.values())
    assert max(distance.values()) > 0
