"""Tests for hf_sp.fisher: diagonal (true) Fisher at w0, its estimators, and safetensors I/O."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F

from hf_sp import _fisher_hooks
from hf_sp._fisher_hooks import multinomial_rows
from hf_sp.fisher import (
    check_fisher,
    estimate_fisher,
    load_fisher,
    resolve_vectorize,
    save_fisher,
)

NUM_CLASSES = 5


def _tiny_model(num_classes: int = NUM_CLASSES, seed: int = 0) -> nn.Sequential:
    """Conv -> BatchNorm -> ReLU -> flatten -> Linear, float64, with non-trivial BatchNorm running stats."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, kernel_size=3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, num_classes),
    ).double()
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return model


def _inputs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _reference_fisher(model: nn.Module, x: torch.Tensor, slots) -> dict[str, torch.Tensor]:
    """Straightforward per-sample, per-class loop: 1/m sum_i sum_(k, w) in slots(p_i) w * (d log f_k(x_i) / dw)^2."""
    was_training = model.training
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ref = {n: torch.zeros_like(p) for n, p in named}
    for i in range(x.shape[0]):
        log_probs = torch.log_softmax(model(x[i : i + 1]), dim=-1)[0]
        for k, weight in slots(i, log_probs.detach().exp()):
            grads = torch.autograd.grad(log_probs[k], [p for _, p in named], retain_graph=True)
            for (n, _), g in zip(named, grads, strict=True):
                ref[n] += weight * g**2
    model.train(was_training)
    return {n: r / x.shape[0] for n, r in ref.items()}


def _exact_slots(i: int, probs: torch.Tensor):
    return [(k, probs[k]) for k in range(probs.shape[0])]


def _assert_close(fisher: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float = 1e-10) -> None:
    assert list(fisher) == list(ref)
    for name in ref:
        assert fisher[name].shape == ref[name].shape, name
        torch.testing.assert_close(fisher[name], ref[name], rtol=rtol, atol=1e-15, msg=name)


# --------------------------------------------------------------------------------------------- exact Fisher


@pytest.mark.parametrize("vectorize", ["hooks", "samples", "classes"])
def test_exact_fisher_matches_reference_and_leaves_model_untouched(vectorize):
    model = _tiny_model()
    model.train()
    x = _inputs(7)
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers_before = {n: b.detach().clone() for n, b in model.named_buffers()}
    # uneven (x, y) batches; labels must be ignored
    loader = [(x[:4], torch.zeros(4, dtype=torch.long)), (x[4:], torch.ones(3, dtype=torch.long))]

    fisher = estimate_fisher(model, loader, vectorize=vectorize, progress=False, dtype=torch.float64)

    # eval mode restored to train, nothing modified (BatchNorm running stats included)
    assert model.training and all(m.training for m in model.modules())
    for n, p in model.named_parameters():
        assert p.requires_grad and p.grad is None
        assert torch.equal(p, params_before[n]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers_before[n]), n

    ref = _reference_fisher(model, x, _exact_slots)  # reference runs in eval mode (running stats)
    _assert_close(fisher, ref)
    assert all(f.device.type == "cpu" and f.dtype == torch.float64 for f in fisher.values())

    # in train mode (batch statistics) the result would differ: the estimate really used eval mode
    model.train()
    batch_stats_logits = model(x[:4])
    model.eval()
    assert not torch.allclose(batch_stats_logits, model(x[:4]))


@pytest.mark.parametrize("vectorize", ["hooks", "samples", "classes"])
def test_chunking_batch_formats_and_max_batches(vectorize):
    model = _tiny_model()
    model.eval()
    x = _inputs(6)
    ref = _reference_fisher(model, x, _exact_slots)
    as_dicts = [{"pixel_values": x[:3], "labels": torch.zeros(3)}, {"pixel_values": x[3:], "labels": torch.zeros(3)}]
    _assert_close(
        estimate_fisher(model, as_dicts, chunk_size=2, vectorize=vectorize, progress=False, dtype=torch.float64), ref
    )
    _assert_close(
        estimate_fisher(model, [x[:3], x[3:]], chunk_size=1, vectorize=vectorize, progress=False, dtype=torch.float64),
        ref,
    )
    assert not model.training  # eval mode restored as eval

    ref_first = _reference_fisher(model, x[:2], _exact_slots)
    loader = [[x[:2], torch.zeros(2)], [x[2:], torch.zeros(4)]]
    _assert_close(
        estimate_fisher(model, iter(loader), max_batches=1, vectorize=vectorize, progress=True, dtype=torch.float64),
        ref_first,
    )


def test_default_dtype_is_float32_on_cpu():
    model = _tiny_model()
    fisher = estimate_fisher(model, [_inputs(3)], progress=False)
    ref = _reference_fisher(model, _inputs(3), _exact_slots)
    for n, f in fisher.items():
        assert f.dtype == torch.float32 and f.device.type == "cpu"
        torch.testing.assert_close(f, ref[n].float(), rtol=1e-5, atol=1e-12)


def test_param_selection():
    model = _tiny_model()
    model[0].bias.requires_grad_(False)
    x = _inputs(4)
    fisher = estimate_fisher(model, [x], progress=False, dtype=torch.float64)
    expected = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(fisher) == expected and "0.bias" not in fisher
    ref = _reference_fisher(model, x, _exact_slots)  # frozen bias is a constant there too
    _assert_close(fisher, ref)
    assert not model[0].bias.requires_grad

    only = estimate_fisher(model, [x], param_names=["4.weight", "0.bias"], progress=False, dtype=torch.float64)
    assert list(only) == ["4.weight", "0.bias"]
    torch.testing.assert_close(only["4.weight"], ref["4.weight"], rtol=1e-10, atol=1e-15)
    assert not model[0].bias.requires_grad

    with pytest.raises(ValueError, match=r"'nope\.weight'"):
        estimate_fisher(model, [x], param_names=["4.weight", "nope.weight", "also.bad"], progress=False)


@pytest.mark.parametrize("num_classes", [1, 2, 5, 40])
def test_multinomial_factor_reproduces_the_class_sum(num_classes):
    """sum_j c_j c_j^T = diag(p) - p p^T = sum_k p_k (e_k - p)(e_k - p)^T with K - 1 rows of zero sum, also for
    probabilities with zeros and for a certain class."""
    gen = torch.Generator().manual_seed(num_classes)
    p = torch.softmax(3 * torch.randn(4, num_classes, dtype=torch.float64, generator=gen), -1)
    if num_classes > 2:
        p[1, 1:3] = 0.0
        p[1] /= p[1].sum()
    p[2] = 0.0
    p[2, -1] = 1.0
    rows = multinomial_rows(p)
    assert rows.shape == (4, num_classes - 1, num_classes)
    expected = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    torch.testing.assert_close(rows.transpose(1, 2) @ rows, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(rows.sum(-1), torch.zeros(4, num_classes - 1, dtype=torch.float64), rtol=0, atol=1e-15)
    for start, stop in [(0, min(1, num_classes - 1)), (1, num_classes - 1), (num_classes // 2, num_classes - 1)]:
        if start > stop:
            continue
        torch.testing.assert_close(multinomial_rows(p, start, stop), rows[:, start:stop], rtol=0, atol=0)


def test_multinomial_factor_keeps_tiny_probabilities():
    """A tail of 1e-170 (its square root products underflow when formed as sqrt(p_j r_{j+1} / r_j) of clamped
    quotients) still gives the exact rows."""
    p = torch.tensor([[0.5, 0.5 - 2e-170, 1e-170, 1e-170]], dtype=torch.float64)
    rows = multinomial_rows(p)
    torch.testing.assert_close(
        rows[0, 2], torch.tensor([0.0, 0.0, 1e-170 / 2**0.5, -1e-170 / 2**0.5], dtype=torch.float64)
    )


def test_exact_hooks_take_one_backward_pass_fewer_than_classes(monkeypatch):
    """The exact Fisher's K weighted class slots become K - 1 unweighted ones on the hooks path; top_k keeps its k."""
    seen = []
    real = _fisher_hooks._cotangents

    def spy(*args):
        cot, weights = real(*args)
        seen.append((tuple(cot.shape), bool((weights == 1).all())))
        return cot, weights

    monkeypatch.setattr(_fisher_hooks, "_cotangents", spy)
    model, x = _tiny_model(), _inputs(3)
    estimate_fisher(model, [x], vectorize="hooks", progress=False, dtype=torch.float64)
    estimate_fisher(model, [x], top_k=2, vectorize="hooks", progress=False, dtype=torch.float64)
    assert seen == [((3, NUM_CLASSES - 1, NUM_CLASSES), True), ((3, 2, NUM_CLASSES), False)]


# --------------------------------------------------------------------------------------------- approximations


@pytest.mark.parametrize("vectorize", ["hooks", "samples", "classes"])
def test_top_k_matches_renormalized_reference(vectorize):
    model = _tiny_model()
    x = _inputs(5)
    k = 2

    def top_slots(i, probs):
        top_p, top_idx = probs.topk(k)
        return list(zip(top_idx.tolist(), top_p / top_p.sum(), strict=True))

    fisher = estimate_fisher(model, [x[:2], x[2:]], top_k=k, vectorize=vectorize, progress=False, dtype=torch.float64)
    _assert_close(fisher, _reference_fisher(model, x, top_slots))
    # top_k >= number of classes is the exact Fisher
    exact = _reference_fisher(model, x, _exact_slots)
    _assert_close(
        estimate_fisher(model, [x], top_k=NUM_CLASSES + 3, vectorize=vectorize, progress=False, dtype=torch.float64),
        exact,
    )


@pytest.mark.parametrize("vectorize", ["hooks", "samples", "classes"])
def test_sampled_labels_match_reference_with_same_draws(vectorize):
    model = _tiny_model()
    x = _inputs(5)
    s = 3
    fisher = estimate_fisher(
        model,
        [x],
        num_label_samples=s,
        generator=torch.Generator().manual_seed(123),
        vectorize=vectorize,
        progress=False,
        dtype=torch.float64,
    )
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=-1)
    labels = torch.multinomial(probs, s, replacement=True, generator=torch.Generator().manual_seed(123))
    ref = _reference_fisher(model, x, lambda i, p: [(int(y), 1.0 / s) for y in labels[i]])
    _assert_close(fisher, ref)


def test_sampled_labels_converge_to_exact():
    model = _tiny_model(num_classes=3)
    x = _inputs(4)
    exact = estimate_fisher(model, [x], progress=False, dtype=torch.float64)
    sampled = estimate_fisher(
        model,
        [x],
        num_label_samples=400,
        generator=torch.Generator().manual_seed(0),
        progress=False,
        dtype=torch.float64,
    )
    again = estimate_fisher(
        model,
        [x],
        num_label_samples=400,
        generator=torch.Generator().manual_seed(0),
        progress=False,
        dtype=torch.float64,
    )
    for name in exact:
        assert torch.equal(sampled[name], again[name])  # deterministic given the generator
        rel = (sampled[name].sum() - exact[name].sum()).abs() / exact[name].sum()
        assert rel < 0.1, (name, rel.item())


# --------------------------------------------------------------------------------------------- real models


def _check_structure(fisher: dict[str, torch.Tensor], model: nn.Module) -> None:
    params = dict(model.named_parameters())
    assert list(fisher) == list(params)
    for name, f in fisher.items():
        assert f.shape == params[name].shape, name
        assert f.dtype == torch.float32 and f.device.type == "cpu"
        assert torch.isfinite(f).all() and (f >= 0).all(), name
    assert sum(f.sum() for f in fisher.values()) > 0
    check_fisher(fisher, model)


def test_auto_uses_hooks_where_samples_decompose():
    assert resolve_vectorize("auto", torch.device("cpu")) == "hooks"
    assert resolve_vectorize("auto", torch.device("cpu"), hooks_supported=False) == "classes"
    assert resolve_vectorize("hooks", torch.device("cuda"), hooks_supported=False) == "samples"
    assert resolve_vectorize("samples", torch.device("cpu")) == "samples"


def test_timm_model():
    timm = pytest.importorskip("timm")
    name = "test_resnet" if "test_resnet" in timm.list_models("test_*") else "resnet10t"
    model = timm.create_model(name, pretrained=False, num_classes=4)
    model.train()
    buffers_before = {n: b.detach().clone() for n, b in model.named_buffers()}
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    fisher = estimate_fisher(model, [(x, torch.zeros(3, dtype=torch.long))], chunk_size=2, progress=False)
    _check_structure(fisher, model)
    assert model.training
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers_before[n]), n
    top = estimate_fisher(model, [x], top_k=2, progress=False)
    _check_structure(top, model)


@pytest.mark.parametrize("vectorize", ["hooks", "samples", "classes"])
def test_transformers_vit_dict_batches_matches_reference(vectorize):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=16,
        patch_size=8,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    loader = [{"pixel_values": x[:2], "labels": torch.zeros(2, dtype=torch.long)}, {"pixel_values": x[2:]}]
    fisher = estimate_fisher(model, loader, vectorize=vectorize, progress=False)
    _check_structure(fisher, model)

    # ModelOutput path + attention under vmap, checked against the loop reference in float64
    model = model.double()

    class Logits(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.inner(pixel_values=pixel_values).logits

    fisher64 = estimate_fisher(model, loader, vectorize=vectorize, progress=False, dtype=torch.float64)
    ref = _reference_fisher(Logits(model), x.double(), _exact_slots)
    _assert_close(fisher64, {n.removeprefix("inner."): r for n, r in ref.items()}, rtol=1e-9)


# --------------------------------------------------------------------------------------------- save / load / check


def test_save_load_round_trip(tmp_path):
    model = _tiny_model()
    fisher = estimate_fisher(model, [_inputs(3)], progress=False)
    path = tmp_path / "sub" / "fisher.safetensors"
    save_fisher(fisher, path, metadata={"source": "tiny", "num_samples": "3"})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "hf_sp.fisher" and meta["source"] == "tiny" and meta["num_samples"] == "3"

    loaded = load_fisher(path, model)
    assert list(loaded) == list(fisher)  # the model's parameter order
    for name in fisher:
        assert loaded[name].dtype == torch.float32 and loaded[name].is_contiguous()
        assert torch.equal(loaded[name], fisher[name])
    assert sorted(load_fisher(path)) == sorted(fisher)  # without a model: safetensors (sorted) order
    subset = load_fisher(path, model, names=["4.weight"])
    assert list(subset) == ["4.weight"]

    # float64 / non-contiguous inputs are stored as contiguous fp32
    save_fisher({"4.weight": fisher["4.weight"].double().t().contiguous().t()}, tmp_path / "nc.safetensors")
    assert torch.equal(load_fisher(tmp_path / "nc.safetensors")["4.weight"], fisher["4.weight"])


def test_load_rejects_mismatched_model(tmp_path):
    model = _tiny_model()
    fisher = estimate_fisher(model, [_inputs(2)], progress=False)
    path = tmp_path / "fisher.safetensors"
    save_fisher(fisher, path)

    other = _tiny_model(num_classes=NUM_CLASSES + 1)  # 4.weight is the first tensor with a different shape
    with pytest.raises(ValueError, match=r"'4\.weight'.*\(5, 64\).*\(6, 64\).*estimate_fisher"):
        load_fisher(path, other)

    partial = {n: f for n, f in fisher.items() if n != "1.bias"}
    save_fisher(partial, tmp_path / "partial.safetensors")
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match=r"'1\.bias' is missing"):
        load_fisher(tmp_path / "partial.safetensors", model, names=names)
    with pytest.raises(ValueError, match=r"'1\.bias' is missing"):
        load_fisher(tmp_path / "partial.safetensors", names=names)

    with pytest.raises(ValueError, match=r"'extra\.weight' is not a parameter"):
        check_fisher({**fisher, "extra.weight": torch.zeros(2)}, model)


def test_check_rejects_bad_values():
    model = _tiny_model()
    fisher = {n: torch.ones_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    check_fisher(fisher, model)
    bad = dict(fisher)
    bad["1.weight"] = torch.tensor([1.0, -1.0, 0.0, 2.0])
    with pytest.raises(ValueError, match=r"'1\.weight'.*negative"):
        check_fisher(bad, model)
    bad["1.weight"] = torch.tensor([1.0, float("nan"), 0.0, 2.0])
    with pytest.raises(ValueError, match=r"'1\.weight'.*NaN"):
        check_fisher(bad, model)
    bad["1.weight"] = torch.tensor([1.0, float("inf"), 0.0, 2.0])
    with pytest.raises(ValueError, match=r"'1\.weight'.*infinite"):
        check_fisher(bad, model)


# --------------------------------------------------------------------------------------------- argument validation


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"num_label_samples": -1}, "num_label_samples"),
        ({"max_batches": 0}, "max_batches"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"top_k": 2, "num_label_samples": 3}, r"top_k.*num_label_samples.*mutually exclusive"),
        ({"vectorize": "batch"}, r"vectorize='batch' is not one of"),
    ],
)
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        estimate_fisher(_tiny_model(), [_inputs(2)], progress=False, **kwargs)


def test_empty_dataloader_and_bad_batches():
    model = _tiny_model()
    model.train()
    with pytest.raises(ValueError, match="no samples"):
        estimate_fisher(model, [], progress=False)
    assert model.training
    with pytest.raises(ValueError, match="pixel_values"):
        estimate_fisher(model, [{"image": _inputs(2)}], progress=False)
    assert model.training  # mode restored after an error, too


class _FunctionalBatchNorm(nn.Module):
    """Not a BatchNorm subclass: its own running statistics, under other names, through ``F.batch_norm`` (as ported
    frozen norms do)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("moving_mean", torch.zeros(channels))
        self.register_buffer("moving_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.moving_mean, self.moving_var, self.weight, self.bias, False, 0.0, 1e-5)


class _NormThenTokens(nn.Module):
    """A BatchNorm (running statistics) whose output is turned into tokens, ``flatten(2).transpose(1, 2)``, as in
    the convolutional stems of XCiT and LeViT: its output gradient is not contiguous."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = _FunctionalBatchNorm(8) if functional else nn.BatchNorm2d(8)
        self.head = nn.Linear(8, NUM_CLASSES)
        with torch.no_grad():
            for name, (low, high) in {"mean": (-0.5, 0.5), "var": (0.5, 2.0)}.items():
                getattr(self.bn, f"moving_{name}" if functional else f"running_{name}").uniform_(low, high)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.bn(self.conv(x)).flatten(2).transpose(1, 2)
        return self.head(torch.tanh(tokens).mean(1))


def _reference_in_pairs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The exact Fisher by the per-sample loop, each sample run twice in one batch (samples are independent in eval
    mode): PyTorch's CPU BatchNorm kernel gives a wrong gradient for a batch of one with a non-contiguous output
    gradient, so the one-sample loop cannot be the reference here."""
    model.eval()
    named = [(n, p) for n, p in model.named_parameters()]
    ref = {n: torch.zeros_like(p) for n, p in named}
    for i in range(x.shape[0]):
        log_probs = torch.log_softmax(model(x[i : i + 1].expand(2, *x.shape[1:])), dim=-1)[0]
        for k in range(log_probs.shape[0]):
            grads = torch.autograd.grad(log_probs[k], [p for _, p in named], retain_graph=True)
            for (n, _), g in zip(named, grads, strict=True):
                ref[n] += log_probs[k].detach().exp() * g**2
    return {n: r / x.shape[0] for n, r in ref.items()}


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
@pytest.mark.parametrize("vectorize", ["hooks", "hooks-per-slot", "samples", "classes"])
def test_batch_norm_with_a_non_contiguous_output_gradient(monkeypatch, vectorize, functional):
    """The one-sample batch's BatchNorm gradient is the kernel's wrong one without the mode where the backward pass
    is not batched (one pass per slot); a module of one's own calling F.batch_norm is found by its call."""
    from hf_sp import _fisher_hooks

    monkeypatch.setattr(_fisher_hooks, "BATCHED_SLOTS", vectorize != "hooks-per-slot")
    vectorize = vectorize.removesuffix("-per-slot")
    torch.manual_seed(0)
    model = _NormThenTokens(functional).double()
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    batches = [x[:1], x[1:]]  # a batch of one sample on every path
    fisher = estimate_fisher(model, batches, vectorize=vectorize, progress=False, dtype=torch.float64)
    _assert_close(fisher, _reference_in_pairs(model, x))


def test_eval_batch_norm_formula_equals_the_kernel():
    from hf_sp._eval_batch_norm import EvalBatchNorm

    bn = _NormThenTokens().double().bn.eval()
    x = torch.randn(4, 8, 3, 3, dtype=torch.float64)
    with EvalBatchNorm():
        y = bn(x)
    torch.testing.assert_close(y, bn(x), rtol=1e-14, atol=1e-14)
    bn.train()  # batch statistics: the kernel, not the formula
    with EvalBatchNorm():
        torch.testing.assert_close(bn(x), torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True))
