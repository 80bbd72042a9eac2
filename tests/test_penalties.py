"""Every penalty's value and gradient against its formula (../shared/PAPER.md), in float64."""

from __future__ import annotations

import math

import pytest
import torch
from formulas import penalty_formula as _formula

from hf_sp import get_penalty, get_penalty_info, list_penalties, register_penalty
from hf_sp.penalties import _registry


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 3, 3, 3), (5, 8), (7,), (4, 2, 1, 1), (2,)]
    w = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    w0 = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    fisher = [torch.rand(s, generator=g, dtype=torch.float64) for s in shapes]
    return w, w0, fisher


PENALTIES = [name for name in list_penalties() if name != "none"]


@pytest.fixture(params=["whole", "blocks"])
def block(request, monkeypatch):
    """Blocks of 10 entries: big tensors split into slices (a last, shorter one), small ones grouped."""
    if request.param == "blocks":
        monkeypatch.setattr(_registry, "CPU_BLOCK_NUMEL", 10)
    return request.param


def test_registry_lists_the_paper_penalties():
    assert set(PENALTIES) == {"l2", "l2_sp", "l1_sp", "group_lasso_sp", "l2_sp_fisher"}
    assert list_penalties()[0] == "none"
    for name in PENALTIES:
        info = get_penalty_info(name)
        assert info.formula and info.description and info.name == name
        assert "ICML 2018" in (info.cls.__doc__ or "")


@pytest.mark.parametrize("name", PENALTIES)
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_value_and_gradient_match_formula(name, scale, block):
    w, w0, fisher = _tensors()
    leaves = [t.clone().requires_grad_(True) for t in w]
    expected = _formula(name, leaves, w0, fisher)
    expected_grads = torch.autograd.grad(expected, leaves)

    out = [torch.full_like(t, 0.5) for t in w]  # the penalty's gradient is added, not assigned
    value, dist_sq = get_penalty(name).accumulate(w, w0, fisher, out, scale)
    torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-12)
    for o, g in zip(out, expected_grads, strict=True):
        torch.testing.assert_close(o, 0.5 + scale * g, rtol=1e-12, atol=1e-12)
    expected_dist = sum(((a - b) ** 2).sum() for a, b in zip(w, w0, strict=True))
    torch.testing.assert_close(dist_sq, expected_dist, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", PENALTIES)
def test_parameters_of_lower_precision_than_their_anchor(name, block):
    """fp32 weights with a float64 anchor (a direct call of the public ``accumulate``): computed in the promoted
    precision, as ``w - w0`` is, never squeezed into a buffer of the weights' type."""
    w, w0, fisher = _tensors(3)
    w32 = [t.float() for t in w]
    expected = _formula(name, [t.double() for t in w32], w0, fisher)
    out = [torch.zeros_like(t) for t in w32]
    value, dist_sq = get_penalty(name).accumulate(w32, w0, fisher, out, 1.0)
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-9)
    expected_dist = sum(((a.double() - b) ** 2).sum() for a, b in zip(w32, w0, strict=True))
    torch.testing.assert_close(dist_sq.double(), expected_dist, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", PENALTIES)
def test_decoupled_step_is_w_minus_lr_times_gradient(name, block):
    """With out=w and scale=-lr, the penalty moves w by -lr * dOmega/dw computed at the old w."""
    w, w0, fisher = _tensors(1)
    leaves = [t.clone().requires_grad_(True) for t in w]
    grads = torch.autograd.grad(_formula(name, leaves, w0, fisher), leaves)
    expected = [t - 0.1 * g for t, g in zip(w, grads, strict=True)]
    get_penalty(name).accumulate(w, w0, fisher, w, -0.1)
    for a, b in zip(w, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["l2_sp", "l1_sp", "group_lasso_sp", "l2_sp_fisher"])
def test_zero_at_the_starting_point(name):
    _, w0, fisher = _tensors(2)
    out = [torch.zeros_like(t) for t in w0]
    value, dist_sq = get_penalty(name).accumulate([t.clone() for t in w0], w0, fisher, out, 1.0)
    assert float(dist_sq) == 0.0
    assert float(value) < 1e-4  # group lasso: sqrt(p_g * eps) per group
    assert all(float(o.abs().max()) == 0.0 for o in out)


@pytest.mark.parametrize("name", PENALTIES)
def test_tensors_that_are_all_empty(name, block):
    """A rank whose shards of a group are all empty (FSDP2's dim-0 sharding of a one-row head): zero sums."""
    empty = [torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.float64)]
    w, w0, fisher, out = ([t.clone() for t in empty] for _ in range(4))
    value, dist_sq = get_penalty(name).accumulate(w, w0 if name != "l2" else None, fisher, out, 1.0)
    assert float(value) == 0.0 and (dist_sq is None if name == "l2" else float(dist_sq) == 0.0)


def test_group_lasso_groups_are_output_channels():
    """Only one output channel moved: only that channel's group is non-zero, with weight sqrt(c_in*kh*kw)."""
    w0 = [torch.zeros(4, 3, 2, 2, dtype=torch.float64)]
    w = [w0[0].clone()]
    w[0][2] = 1.0  # ||w_g - w0_g|| = sqrt(12) for group 2
    out = [torch.zeros_like(w[0])]
    value, _ = get_penalty("group_lasso_sp").accumulate(w, w0, None, out, 1.0)
    assert float(value) == pytest.approx(math.sqrt(12) * math.sqrt(12), abs=1e-4)
    torch.testing.assert_close(out[0][2], torch.full((3, 2, 2), 1.0, dtype=torch.float64))
    assert float(out[0][[0, 1, 3]].abs().max()) == 0.0


def test_unknown_penalty_lists_known_ones():
    with pytest.raises(ValueError, match=r"Unknown penalty 'l3_sp'.*l2_sp"):
        get_penalty("l3_sp")


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_penalty("l2_sp", formula="", description="")(type("X", (), {}))


COMPILABLE = [name for name in PENALTIES if get_penalty(name).compilable]


def test_only_elementwise_penalties_compile():
    assert set(COMPILABLE) == {"l2", "l2_sp", "l1_sp", "l2_sp_fisher"}
    from hf_sp.penalties._compiled import CompiledStep

    with pytest.raises(ValueError, match="sp_compile=False"):
        CompiledStep(get_penalty("group_lasso_sp"))


@pytest.mark.parametrize("name", COMPILABLE)
def test_compiled_step_matches_formula(name, fresh_compiler):
    """The one-pass compiled step (sp_compile) against the formula in float64: two groups of different scales,
    one tensor not contiguous, and the decoupled form (``out`` is ``w``)."""
    from hf_sp.penalties._compiled import CompiledStep

    w, w0, fisher = _tensors()
    g = torch.Generator().manual_seed(5)
    w.append(torch.randn(3, 7, generator=g, dtype=torch.float64))
    w0.append(torch.randn(3, 7, generator=g, dtype=torch.float64))
    fisher.append(torch.rand(3, 7, generator=g, dtype=torch.float64))
    w[1] = w[1].t().contiguous().t()  # not contiguous
    leaves = [t.clone().requires_grad_(True) for t in w]
    expected = _formula(name, leaves, w0, fisher)
    expected_grads = torch.autograd.grad(expected, leaves)
    expected_dist = sum(((a - b) ** 2).sum() for a, b in zip(w, w0, strict=True))
    scales, groups = [0.37, 1.0], [0, 1, 0, 1, 0, 1]
    step = CompiledStep(get_penalty(name))
    graphs = fresh_compiler()

    out = [torch.full_like(t, 0.5) for t in w]
    value, dist_sq = step(w, w0, fisher, out, scales, groups)
    assert fresh_compiler() > graphs
    torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dist_sq, expected_dist, rtol=1e-12, atol=0)
    for o, grad, k in zip(out, expected_grads, groups, strict=True):
        torch.testing.assert_close(o, 0.5 + scales[k] * grad, rtol=1e-12, atol=1e-12)

    moved = [t.clone() for t in w]
    step(moved, w0, fisher, moved, [-0.1, -0.2], groups)
    for a, t, grad, k in zip(moved, w, expected_grads, groups, strict=True):
        torch.testing.assert_close(a, t - [0.1, 0.2][k] * grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", COMPILABLE)
@pytest.mark.parametrize(
    ("dtype", "decoupled"), [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32-gradient", "bf16-decoupled"]
)
def test_compiled_step_is_one_loop_per_tensor(name, dtype, decoupled, fresh_compiler):
    """The compiler emits one loop per tensor (update and both sums in it), for 40 tensors: more than 31, where
    ``torch.stack`` of the sums would split every tensor's loop in two, as inductor's default settings do too."""
    from torch._inductor import metrics

    from hf_sp.penalties._compiled import CompiledStep

    g = torch.Generator().manual_seed(3)
    n = 40
    w = [torch.randn(4, 8, 3, generator=g).to(dtype) for _ in range(n)]
    w0 = [torch.randn(4, 8, 3, generator=g) for _ in range(n)]
    fisher = [torch.rand(4, 8, 3, generator=g) for _ in range(n)]
    out = w if decoupled else [torch.zeros_like(t) for t in w]
    metrics.reset()
    CompiledStep(get_penalty(name))(w, w0, fisher, out, [0.1], [0] * n)
    # One loop a tensor, and at most two more for the totals (the compiled code counts its loops when generated).
    assert n <= metrics.generated_kernel_count <= n + 2


def test_compiled_step_computes_half_precision_tensors_in_fp32(fresh_compiler):
    """bf16 weights, fp32 anchors: the penalty is computed in fp32 (as the eager path casts), contiguous or not;
    in bf16 itself, the sum of squares of a 400 x 400 tensor would be off by far more than fp32 rounding."""
    from hf_sp.penalties._compiled import CompiledStep

    g = torch.Generator().manual_seed(7)
    w = [torch.randn(400, 400, generator=g).bfloat16(), torch.randn(400, 400, generator=g).bfloat16().t()]
    w0 = [torch.zeros(400, 400), torch.zeros(400, 400).t()]
    out = [torch.zeros_like(t) for t in w]
    value, dist_sq = CompiledStep(get_penalty("l2"))(w, w0, None, out, [1.0], [0, 0])
    expected = sum(0.5 * (t.double() ** 2).sum() for t in w)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(dist_sq.double(), 2 * expected, rtol=1e-5, atol=0)
    for o, t in zip(out, w, strict=True):
        torch.testing.assert_close(o, t)


def test_compiled_step_scales_float64_tensors_in_float64(fresh_compiler):
    """An fp32 tensor before an fp64 one in the same call: the fp64 tensor's scale is not rounded to fp32."""
    from hf_sp.penalties._compiled import CompiledStep

    g = torch.Generator().manual_seed(11)
    w = [torch.randn(5, generator=g), torch.randn(5, generator=g, dtype=torch.float64)]
    w0 = [torch.zeros(5), torch.zeros(5, dtype=torch.float64)]
    out = [torch.zeros_like(t) for t in w]
    CompiledStep(get_penalty("l2_sp"))(w, w0, None, out, [1.3], [0, 0])
    torch.testing.assert_close(out[1], 1.3 * w[1], rtol=1e-15, atol=0)


def test_compiled_step_past_the_recompile_limit_steps_uncompiled(fresh_compiler, caplog):
    """A run whose set of tensors keeps changing: once the compiler gives up, the same formulas run uncompiled,
    with a warning, and give the same result; no tensors at all give zeros."""
    from hf_sp.penalties._compiled import CompiledStep

    step = CompiledStep(get_penalty("l2_sp"))
    w, w0, fisher = _tensors(4)
    for n in (len(w), len(w) - 1):  # the second set of tensors needs a second graph
        out = [torch.zeros_like(t) for t in w[:n]]
        with torch._dynamo.config.patch(recompile_limit=1):
            value, dist_sq = step(w[:n], w0[:n], None, out, [1.0], [0] * n)
        expected = sum(((a - b) ** 2).sum() for a, b in zip(w[:n], w0[:n], strict=True))
        torch.testing.assert_close(dist_sq, expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(value, 0.5 * expected, rtol=1e-12, atol=0)
        for o, a, b in zip(out, w, w0, strict=False):
            torch.testing.assert_close(o, a - b, rtol=1e-12, atol=0)
    assert "compiled too many times" in caplog.text
    value, dist_sq = step([], [], None, [], [1.0], [])
    assert float(value) == 0.0 and float(dist_sq) == 0.0
