"""The hook path of estimate_fisher (vectorize="hooks"): each layer rule, the per-sample copies of broadcast
parameters and the torch.func fallback, against the per-sample loop in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_sp import _per_sample
from hf_sp._fisher_hooks import HookedFisher
from hf_sp.fisher import estimate_fisher
from tests.test_fisher import _assert_close, _exact_slots, _reference_fisher

K = 4


class Scale(nn.Module):
    """A module without a rule whose parameter is not broadcast over the batch: the torch.func fallback."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.unsqueeze(-1)


class Tokens(nn.Module):
    """Embedding (repeated ids, padding row), a broadcast position table, attention (fallback), LayerNorm,
    a Linear called twice (its positions add up before squaring), Conv1d, GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 6, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(1, 5, 6))
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.ln = nn.LayerNorm(6)
        self.lin = nn.Linear(6, 6)
        self.conv = nn.Conv1d(6, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.scale = Scale(4)
        self.head = nn.Linear(4, K)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) + self.pos
        h = self.ln(self.attn(h, h, h, need_weights=False)[0])
        h = self.lin(torch.tanh(self.lin(h)))
        h = self.scale(self.gn(self.conv(h.transpose(1, 2))))
        return self.head(h.mean(-1))


class Images(nn.Module):
    """Grouped, strided, dilated Conv2d; BatchNorm (eval) followed by an in-place ReLU and an in-place residual
    add; timm's LayerNorm2d; a conv with reflect padding (no rule: fallback); a Linear on flat features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect")
        self.conv3 = nn.Conv2d(6, 6, 1, bias=False)
        self.head = nn.Linear(6 * 9, K)
        try:
            from timm.layers import LayerNorm2d
        except ImportError:  # pragma: no cover - timm is a dependency
            self.norm = nn.Identity()
        else:
            self.norm = LayerNorm2d(6)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.conv1(x)))
        r = self.conv3(h)
        r += self.conv2(h)
        return self.head(self.norm(r).flatten(1))


def _ids(n: int) -> torch.Tensor:
    ids = torch.randint(0, 7, (n, 5), generator=torch.Generator().manual_seed(3))
    ids[:, 0] = 2  # a repeated id in every sample
    ids[:, 1] = 2
    ids[0, 4] = 0  # the padding row gets no gradient
    return ids


@pytest.mark.parametrize(
    ("model", "x"),
    [
        (Tokens, _ids(5)),
        (Images, torch.randn(5, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))),
    ],
)
def test_hooks_match_the_loop_for_every_rule(model, x):
    torch.manual_seed(0)
    net = model().double()
    fisher = estimate_fisher(net, [x[:3], x[3:]], vectorize="hooks", progress=False, dtype=torch.float64)
    ref = _reference_fisher(net, x, _exact_slots)
    _assert_close(fisher, ref)
    assert all(float(f.abs().max()) > 0 for n, f in fisher.items()), "every parameter gets a non-zero Fisher"
    engine = HookedFisher(net, list(ref))
    kinds = {u.prefix: "rule" if u.rule else "torch.func" for u in engine.units}
    if model is Tokens:
        assert engine.replicas == ["pos"]
        assert kinds["attn"] == kinds["scale"] == "torch.func" and kinds["emb"] == kinds["lin"] == "rule"
    else:
        assert kinds["conv2"] == "torch.func" and kinds["conv1"] == kinds["bn"] == kinds["norm"] == "rule"


@pytest.mark.parametrize("branch", ["pairs", "materialize"])
@pytest.mark.parametrize("length", [1, 3, 7])
@pytest.mark.parametrize("block", [50, 130, 10**6], ids=["slot-by-slot", "two-slots", "one-chunk"])
def test_outer_square_sums_both_branches(monkeypatch, branch, length, block):
    """sum_{s,b} w (sum_l g x^T)^2 by the Gram-matrix pairs and by materialized per-sample gradients, in chunks of
    one slot and sample, of two slots, and in one chunk (a per-sample gradient is 60 floats here)."""
    g_ = torch.Generator().manual_seed(length)
    x = torch.randn(3, length, 2, 5, dtype=torch.float64, generator=g_)
    g = torch.randn(4, 3, length, 2, 6, dtype=torch.float64, generator=g_)
    w = torch.rand(4, 3, dtype=torch.float64, generator=g_)
    monkeypatch.setattr(_per_sample, "_MATERIALIZE_PASSES", 10**6 if branch == "pairs" else -(10**6))
    monkeypatch.setattr(_per_sample, "BLOCK", block)
    expected = torch.zeros(2, 6, 5, dtype=torch.float64)
    for s in range(4):
        for b in range(3):
            per_sample = torch.einsum("lgo,lgi->goi", g[s, b], x[b])
            expected += w[s, b] * per_sample**2
    torch.testing.assert_close(_per_sample._outer_sq(x, g, w), expected, rtol=1e-12, atol=1e-14)


class CopiesFirst(nn.Module):
    """Uses its broadcast-looking parameter through ``[0]``: per-sample copies would send every gradient to copy 0."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, 6))
        self.head = nn.Linear(6, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(x * self.table[0]))


def test_copies_that_mix_samples_fall_back_to_torch_func():
    torch.manual_seed(0)
    net = CopiesFirst().double()
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fisher = estimate_fisher(net, [x[:2], x[2:]], vectorize="hooks", progress=False, dtype=torch.float64)
    _assert_close(fisher, _reference_fisher(net, x, _exact_slots))


def test_batch_statistics_are_not_decomposed():
    net = nn.Sequential(
        nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, track_running_stats=False), nn.Flatten(), nn.Linear(12, K)
    ).double()
    assert not HookedFisher.supported(net, [n for n, _ in net.named_parameters()])
    x = torch.randn(4, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fisher = estimate_fisher(net, [x], vectorize="hooks", progress=False, dtype=torch.float64)
    # the hooks would mix the samples through the batch statistics: the torch.func path runs instead
    _assert_close(fisher, estimate_fisher(net, [x], vectorize="classes", progress=False, dtype=torch.float64))
