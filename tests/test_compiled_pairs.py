"""estimate_fisher(compile=True): the position-pair products of the hooks path by one compiled kernel
(hf_sp._compiled_pairs), against their formula and the per-sample loop in float64; its errors and its fallback."""

from __future__ import annotations

import logging
import types

import pytest
import torch
from torch import nn

from hf_sp import _compiled_pairs, _per_sample
from hf_sp.fisher import estimate_fisher
from tests.test_fisher import _assert_close, _exact_slots, _reference_fisher


def spy_on_the_kernel(monkeypatch) -> list[bool]:
    """Whether each call of the compiled kernel ran it (``True``) or fell back (``False``), from now on."""
    made: list[bool] = []
    run = _compiled_pairs.run

    def spy(*args):
        out = run(*args)
        made.append(out is not None)
        return out

    monkeypatch.setattr(_compiled_pairs, "run", spy)
    return made


@pytest.fixture
def calls(monkeypatch) -> list[bool]:
    return spy_on_the_kernel(monkeypatch)


def test_pair_products_match_their_formula():
    """M[b, p, c] = sum_s w[s, b] g[s, b, l, c] g[s, b, l', c] and X[b, p, i] = f_p x[b, l, i] x[b, l', i] for the
    pairs p = (l, l'), l <= l', f_p = 2 off the diagonal (the weights as sqrt(w) on g): the formula as written, and
    compiled."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 4, 5, 6, dtype=torch.float64, generator=gen)
    x = torch.randn(4, 5, 7, dtype=torch.float64, generator=gen)
    w = torch.rand(3, 4, dtype=torch.float64, generator=gen)
    li, lj = (t.clone() for t in torch.triu_indices(5, 5))
    gram = torch.zeros(4, li.numel(), 6, dtype=torch.float64)
    xx = torch.zeros(4, li.numel(), 7, dtype=torch.float64)
    for p, (l1, l2) in enumerate(zip(li.tolist(), lj.tolist(), strict=True)):
        for b in range(4):
            xx[b, p] = (1 if l1 == l2 else 2) * x[b, l1] * x[b, l2]
            for s in range(3):
                gram[b, p] += w[s, b] * g[s, b, l1] * g[s, b, l2]
    scaled = g * w.sqrt()[:, :, None, None]  # the weights, as the callers pass them
    for products in (_compiled_pairs.pair_products(scaled, x, li, lj), _compiled_pairs.run(scaled, x, li, lj)):
        torch.testing.assert_close(products[0], gram, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(products[1], xx, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("weights", ["weighted", "unweighted", "unweighted-strided"])
@pytest.mark.parametrize("length", [2, 7])
@pytest.mark.parametrize("block", [50, 10**6], ids=["sample-by-sample", "one-chunk"])
def test_outer_square_by_the_compiled_kernel(monkeypatch, calls, weights, length, block):
    """sum_{s,b} w (sum_l g x^T)^2 by position pairs with the compiled kernel: weighted and unweighted slots,
    gradients channels first (as a convolution's come), two groups, one chunk and chunks of one sample."""
    gen = torch.Generator().manual_seed(length)
    x = torch.randn(3, length, 2, 5, dtype=torch.float64, generator=gen)
    g = torch.randn(4, 3, length, 2, 6, dtype=torch.float64, generator=gen)
    if weights == "unweighted-strided":
        g = g.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    w = torch.rand(4, 3, dtype=torch.float64, generator=gen) if weights == "weighted" else torch.ones(4, 3).double()
    monkeypatch.setattr(_per_sample, "_MATERIALIZE_PASSES", 10**6)  # always by pairs
    monkeypatch.setattr(_per_sample, "BLOCK", block)
    expected = torch.zeros(2, 6, 5, dtype=torch.float64)
    for s in range(4):
        for b in range(3):
            expected += w[s, b] * torch.einsum("lgo,lgi->goi", g[s, b], x[b]) ** 2
    with _per_sample.workspace(compiled=True):
        torch.testing.assert_close(_per_sample._outer_sq(x, g, w), expected, rtol=1e-12, atol=1e-14)
    assert calls and all(calls), "every chunk's pairs came from the compiled kernel"
    assert len(calls) == (3 if block == 50 else 1)


class Patches(nn.Module):
    """Tokens from a strided convolution (few positions: pairs), a Linear over them, a LayerNorm, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 6, 2, stride=2)
        self.mix = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).flatten(2).transpose(1, 2)  # [B, 9, 6]
        return self.head(self.norm(torch.tanh(self.mix(h))).mean(1))


def test_compiled_fisher_matches_the_loop(monkeypatch, calls):
    """The exact Fisher with compile=True equals the per-sample loop (float64), over two batches."""
    monkeypatch.setattr(_per_sample, "_MATERIALIZE_PASSES", 10**6)  # pairs for the convolution too
    torch.manual_seed(0)
    net = Patches().double()
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fisher = estimate_fisher(net, [x[:3], x[3:]], compile=True, progress=False, dtype=torch.float64)
    _assert_close(fisher, _reference_fisher(net, x, _exact_slots))
    # one call per batch and layer over several positions (the convolution, the Linear on its tokens), after
    # check_compiler's
    assert calls == [True] * 5


def test_timm_vit_compiled_matches_eager(calls):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=32)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    eager = estimate_fisher(model, [x], progress=False)
    compiled = estimate_fisher(model, [x], progress=False, compile=True)
    _assert_close(compiled, eager, rtol=1e-4)
    assert len(calls) > 1 and all(calls), "the ViT's Linear layers over its 5 tokens went through the kernel"


def test_compile_errors_name_the_argument():
    net = Patches()
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(ValueError, match="compile=True compiles the pair products of vectorize='hooks'"):
        estimate_fisher(net, [x], vectorize="samples", compile=True, progress=False)
    with pytest.raises(ValueError, match="compile must be True or False"):
        estimate_fisher(net, [x], compile="yes", progress=False)


def test_a_missing_compiler_is_reported_before_the_first_batch(monkeypatch):
    def broken():
        def kernel(*args):
            raise RuntimeError("no C++ compiler found")

        return kernel

    monkeypatch.setattr(_compiled_pairs, "_compile", broken)
    monkeypatch.setattr(_compiled_pairs, "_KERNEL", [])
    batches = []

    def loader():
        batches.append(1)
        yield torch.randn(2, 3, 6, 6)

    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler found.*Pass compile=False"):
        estimate_fisher(Patches(), loader(), compile=True, progress=False)
    assert not batches


def test_past_the_recompile_limit_the_pairs_are_built_eagerly(monkeypatch, caplog):
    tries = []

    def limited(*args):
        tries.append(1)
        raise torch._dynamo.exc.FailOnRecompileLimitHit("recompile limit")

    monkeypatch.setattr(_compiled_pairs, "_KERNEL", [limited])
    monkeypatch.setattr(_per_sample, "_MATERIALIZE_PASSES", 10**6)
    torch.manual_seed(0)
    net = Patches().double()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.WARNING, logger="hf_sp._compiled_pairs"):
        fisher = estimate_fisher(net, [x], compile=True, progress=False, dtype=torch.float64)
        again = estimate_fisher(net, [x], compile=True, progress=False, dtype=torch.float64)
    _assert_close(fisher, _reference_fisher(net, x, _exact_slots))
    _assert_close(again, fisher)
    assert _compiled_pairs._KERNEL == [None] and len(tries) == 1, "tried once, then eager from then on"
    assert caplog.text.count("compiled too many times") == 1


def test_under_autocast_the_pairs_are_built_in_the_inputs_dtype(monkeypatch, calls):
    """Under autocast the output gradients may come in bfloat16 while the inputs are float32: the compiled
    pairs are made in the inputs' dtype, as the eager ones, and the Fisher is the eager path's."""
    monkeypatch.setattr(_per_sample, "_MATERIALIZE_PASSES", 10**6)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 3))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = estimate_fisher(net, [x], progress=False)
        compiled = estimate_fisher(net, [x], compile=True, progress=False)
    assert calls and all(calls)
    for name, value in eager.items():  # within bfloat16's rounding (eager rounds the first slot's products to it)
        assert float((compiled[name] - value).abs().max()) <= 2**-8 * float(value.abs().max()), name


def test_the_callers_grad_mode_compiles_no_other_variant(monkeypatch):
    """The kernel runs without grad whatever the caller's mode: the compiler check under no_grad and the
    estimate's own calls share one compiled variant."""
    # a code object of its own: the compiler's cache is per code object, and other tests filled pair_products'
    code = _compiled_pairs.pair_products.__code__.replace()
    fresh = types.FunctionType(code, _compiled_pairs.pair_products.__globals__, "pair_products")
    monkeypatch.setattr(_compiled_pairs, "_KERNEL", [torch.compile(fresh, dynamic=True, fullgraph=True)])
    gen = torch.Generator().manual_seed(0)
    g, x = torch.randn(3, 4, 5, 6, generator=gen), torch.randn(4, 5, 7, generator=gen)
    li, lj = (t.clone() for t in torch.triu_indices(5, 5))
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        _compiled_pairs.run(g, x, li, lj)
    with torch.enable_grad():
        _compiled_pairs.run(g.requires_grad_(), x, li, lj)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames == 1
