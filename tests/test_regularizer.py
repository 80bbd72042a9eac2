"""SPRegularizer on a bare optimizer: chunking, dtypes, flattened groups (ZeRO-style), missing anchors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_sp import regularizer as reg_module
from hf_sp import split_parameters
from hf_sp.regularizer import ANCHOR_KEY, MissingAnchorError, SPRegularizer

torch_version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 5).to(dtype)
        self.conv = nn.Conv1d(5, 4, 1).to(dtype)
        self.classifier = nn.Linear(4, 3).to(dtype)


def setup(penalty="l2_sp", dtype=torch.float32, momentum=0.0, **kwargs):
    model = Net(dtype)
    split = split_parameters(model, head_modules=["classifier"])
    reg = SPRegularizer(penalty, alpha=0.5, beta=0.25, split=split, **kwargs)
    reg.capture_allowed = True
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    reg.prepare_optimizer(opt, model.named_parameters())
    return model, reg, opt


def step_with_grads(model, opt, value=0.0):
    for p in model.parameters():
        p.grad = torch.full_like(p, value)
    opt.step()


def test_groups_split_by_role():
    model, reg, opt = setup()
    roles = {g["sp_role"]: g["sp_names"] for g in opt.param_groups}
    assert roles["anchored"] == ["body.weight", "conv.weight"]
    assert roles["new"] == ["classifier.weight"]
    assert set(roles["free"]) == {"body.bias", "conv.bias", "classifier.bias"}


def test_chunking_does_not_change_the_result(monkeypatch):
    results = []
    for chunk in (1 << 24, 7):
        monkeypatch.setattr(reg_module, "CHUNK_NUMEL", chunk)
        model, reg, opt = setup()
        step_with_grads(model, opt)  # captures w0, moves nothing but the head (beta)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3)
        step_with_grads(model, opt)
        results.append([p.detach().clone() for p in model.parameters()] + [torch.tensor(reg.pop_metrics()["sp_body"])])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_bf16_parameters_get_an_fp32_anchor():
    model, reg, opt = setup(dtype=torch.bfloat16)
    start = model.body.weight.detach().float().clone()
    step_with_grads(model, opt)
    anchor = opt.state[model.body.weight][ANCHOR_KEY]
    assert anchor.dtype == torch.float32 and torch.equal(anchor, start)
    step_with_grads(model, opt)
    assert torch.isfinite(torch.tensor(reg.pop_metrics()["sp_dist"]))


def flatten_groups(opt):
    """What DeepSpeed ZeRO does to the client optimizer: one flat fp32 tensor per param group."""
    for group in opt.param_groups:
        flat = torch.cat([p.detach().reshape(-1) for p in group["params"]]).requires_grad_(True)
        group["params"] = [flat]


def test_elementwise_penalty_on_flattened_groups():
    model, reg, opt = setup("l2_sp")
    flatten_groups(opt)
    anchored = next(g for g in opt.param_groups if g["sp_role"] == "anchored")["params"][0]
    start = anchored.detach().clone()
    for g in opt.param_groups:
        g["params"][0].grad = torch.zeros_like(g["params"][0])
    opt.step()
    torch.testing.assert_close(opt.state[anchored][ANCHOR_KEY], start)
    with torch.no_grad():
        anchored.add_(1.0)
    anchored.grad = torch.zeros_like(anchored)
    opt.step()  # gradient alpha * (w - w0) = 0.5 everywhere, lr 0.1
    torch.testing.assert_close(anchored.detach(), start + 1.0 - 0.1 * 0.5)


@pytest.mark.parametrize("penalty", ["group_lasso_sp", "l2_sp_fisher"])
def test_structured_penalties_refuse_flattened_groups(penalty):
    fisher = None
    if penalty == "l2_sp_fisher":
        fisher = {"body.weight": torch.ones(5, 6), "conv.weight": torch.ones(4, 5, 1)}
    model, reg, opt = setup(penalty, fisher=fisher)
    flatten_groups(opt)
    for g in opt.param_groups:
        g["params"][0].grad = torch.zeros_like(g["params"][0])
    with pytest.raises(RuntimeError, match="flattened"):
        opt.step()


def test_no_capture_without_permission():
    model, reg, opt = setup()
    reg.capture_allowed = False
    with pytest.raises(MissingAnchorError, match="'body.weight' has no starting-point anchor"):
        step_with_grads(model, opt)


def test_decoupled_mode_scales_by_the_group_learning_rate():
    model, reg, opt = setup(mode="decoupled")
    step_with_grads(model, opt)
    start = model.body.weight.detach().clone()
    with torch.no_grad():
        model.body.weight.add_(1.0)
    step_with_grads(model, opt)  # w <- w - lr * alpha * (w - w0), then SGD with zero gradient
    torch.testing.assert_close(model.body.weight.detach(), start + 1.0 - 0.1 * 0.5 * 1.0)


def test_distance_from_the_optimizer_state():
    model, reg, opt = setup()
    assert reg.distance(opt) is None
    step_with_grads(model, opt)
    with torch.no_grad():
        model.body.weight.add_(2.0)
    dist, rel = reg.distance(opt)
    anchor = opt.state[model.body.weight][ANCHOR_KEY]
    norm = (anchor.square().sum() + opt.state[model.conv.weight][ANCHOR_KEY].square().sum()).sqrt()
    assert dist == pytest.approx(2.0 * (30**0.5), rel=1e-6)
    assert rel == pytest.approx(dist / float(norm), rel=1e-6)


def test_metrics_are_folded_every_few_steps_and_averaged_over_the_whole_window(monkeypatch):
    """A run that never logs keeps at most FOLD_STEPS records; the window average does not depend on folding."""
    metrics = []
    for fold in (1000, 3):
        monkeypatch.setattr(reg_module, "FOLD_STEPS", fold)
        model, reg, opt = setup()
        for step in range(10):
            step_with_grads(model, opt, value=0.1 * (step % 4))  # the weights move, so every step differs
            assert len(reg._records) < fold
        metrics.append(reg.pop_metrics())
        assert reg._records == [] and reg.pop_metrics() == {}  # the window starts again
    assert metrics[0].keys() == {"sp_body", "sp_head", "sp_dist"}
    for key in metrics[0]:
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-12)
    assert metrics[0]["sp_dist"] > 0


def test_divergence_stops_the_step_within_fold_steps_without_any_log(monkeypatch):
    monkeypatch.setattr(reg_module, "FOLD_STEPS", 4)
    model, reg, opt = setup()
    step_with_grads(model, opt)
    with torch.no_grad():
        model.body.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="l2_sp penalty became non-finite"):
        for _ in range(4):
            step_with_grads(model, opt)
    assert reg._records == []


@pytest.mark.parametrize("mode", ["gradient", "decoupled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_step_equals_the_eager_kernels(mode, dtype, fresh_compiler):
    """compile=True (sp_compile) takes every anchored group in one compiled call: same weights and logged values
    as the eager kernels, with two anchored groups of different learning rates (the scale of each in decoupled
    mode) and bf16 weights (computed in fp32 against their fp32 anchor)."""
    runs = []
    for compile in (False, True):
        model, reg, opt = setup(mode=mode, dtype=dtype, compile=compile)
        anchored = next(g for g in opt.param_groups if g["sp_role"] == "anchored")
        second = {**anchored, "params": anchored["params"][1:], "sp_names": anchored["sp_names"][1:], "lr": 0.3}
        anchored["params"], anchored["sp_names"] = anchored["params"][:1], anchored["sp_names"][:1]
        opt.param_groups.append(second)
        graphs = fresh_compiler()
        step_with_grads(model, opt, 0.1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.linspace(-1, 1, p.numel()).view(p.shape).to(dtype))
        step_with_grads(model, opt, 0.1)
        assert (fresh_compiler() > graphs) == compile
        runs.append(([p.detach().float().clone() for p in model.parameters()], reg.pop_metrics()))
    (eager, eager_metrics), (compiled, compiled_metrics) = runs
    # bf16: both round the penalty's gradient to bf16 before adding it (emulate_precision_casts), so they agree
    # bit for bit (torch 2.14; 2.11's inductor rounds once, 1 ulp away in 2 of the 20 entries); fp32 may differ by
    # the rounding of a fused multiply-add
    bf16_tol = 0.0 if torch_version >= (2, 14) else 2.0**-8
    tol = bf16_tol if dtype == torch.bfloat16 else 1e-6
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert eager_metrics.keys() == compiled_metrics.keys()
    for key, value in eager_metrics.items():
        assert compiled_metrics[key] == pytest.approx(value, rel=1e-6)


def test_compiled_step_with_no_anchored_gradient(fresh_compiler):
    """The whole body frozen for a while (gradual unfreezing): no anchored tensor has a gradient; the compiled
    path logs what the eager one logs (a zero body value) instead of failing."""
    runs = []
    for compile in (False, True):
        model, reg, opt = setup(compile=compile)
        for p in model.parameters():
            p.grad = torch.ones_like(p) if p is model.classifier.weight else None
        opt.step()
        runs.append(reg.pop_metrics())
    assert runs[0] == runs[1] and runs[1]["sp_body"] == 0.0


def test_anchor_and_fisher_take_the_parameters_memory_layout():
    """A channels_last convolution: w0 and the Fisher (loaded contiguous) are stored with the parameter's strides,
    so that the compiled step reads all its operands in one loop; the values are the Fisher's."""
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(4, 2))
    split = split_parameters(model, head_modules=["2"])
    fisher = {n: torch.rand(p.shape) for n, p in model.named_parameters() if n in split.anchored}
    reg = SPRegularizer("l2_sp_fisher", alpha=0.5, beta=0.0, split=split, fisher=fisher)
    reg.capture_allowed = True
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.prepare_optimizer(opt, model.named_parameters())
    step_with_grads(model, opt)
    state = opt.state[conv.weight]
    assert not conv.weight.is_contiguous() and conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert state[ANCHOR_KEY].stride() == state["sp_fisher"].stride() == conv.weight.stride()
    torch.testing.assert_close(state["sp_fisher"], fisher["0.weight"], rtol=0, atol=0)


# torch.distributed.checkpoint fills an empty optimizer state with one step (every gradient and learning rate zero)
# before it saves or loads one: accelerate's FSDP2 checkpoints go through it.
def test_a_state_filled_before_the_first_step_holds_the_pretrained_anchors_and_no_record():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, reg, opt = setup()
    pretrained = model.body.weight.detach().clone()
    saved = get_optimizer_state_dict(model, opt)
    assert torch.equal(saved["state"]["body.weight"][ANCHOR_KEY], pretrained)
    assert reg.pop_metrics() == {}  # the fill is no step of the run
    torch.testing.assert_close(model.body.weight.detach(), pretrained)
    with torch.no_grad():
        model.body.weight.add_(1.0)
    step_with_grads(model, opt)
    assert reg.pop_metrics()["sp_dist"] == pytest.approx(30**0.5, rel=1e-6)


def test_a_warm_up_step_at_learning_rate_zero_is_a_step_of_the_run():
    model, reg, opt = setup()
    for group in opt.param_groups:
        group["lr"] = 0.0
    step_with_grads(model, opt, value=1.0)
    assert ANCHOR_KEY in opt.state[model.body.weight]
    assert reg.pop_metrics()["sp_head"] > 0


def _checkpoint():
    """Model and optimizer state of a run two steps in, the weights moved off their anchors."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, reg, opt = setup(momentum=0.9)  # every tensor has a state to save
    step_with_grads(model, opt)
    with torch.no_grad():
        model.body.weight.add_(0.3)
    step_with_grads(model, opt)
    return get_state_dict(model, opt), opt.state[model.body.weight][ANCHOR_KEY].clone()


@pytest.mark.parametrize("full", [False, True], ids=["as_saved", "full_state"])
@pytest.mark.parametrize("with_anchors", [True, False])
def test_a_load_through_a_filled_state_keeps_the_checkpoints_anchors_or_refuses(with_anchors, full):
    """A full-state load (accelerate's FULL_STATE_DICT) keeps the keys of the filled state that the checkpoint
    lacks: the placeholders must then be refused, not trained toward."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    (model_sd, optim_sd), anchor = _checkpoint()
    if not with_anchors:  # a checkpoint of a run without SP
        for entry in optim_sd["state"].values():
            entry.pop(ANCHOR_KEY, None)
    model, reg, opt = setup(momentum=0.9)
    reg.capture_allowed = False  # a resume: the anchors must come from the checkpoint
    options = StateDictOptions(full_state_dict=True) if full else None
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)
    if with_anchors:
        assert reg.missing_anchors(opt) == []
        assert torch.equal(opt.state[model.body.weight][ANCHOR_KEY], anchor)
        step_with_grads(model, opt)
        assert reg.pop_metrics()["sp_dist"] > 0 and not reg._placeholders  # checked once
    else:
        assert reg.missing_anchors(opt) == ["body.weight", "conv.weight"]
        with pytest.raises(MissingAnchorError, match="'body.weight'"):
            step_with_grads(model, opt)


def test_a_fisher_that_the_checkpoint_lacks_is_missing():
    """An l2_sp checkpoint resumed with l2_sp_fisher: the anchors are there, the Fisher is not."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    (model_sd, optim_sd), _ = _checkpoint()
    fisher = {n: torch.ones_like(p) for n, p in Net().named_parameters()}
    model, reg, opt = setup("l2_sp_fisher", momentum=0.9, fisher=fisher)
    reg.capture_allowed = False
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    assert reg.missing_anchors(opt) == ["body.weight", "conv.weight"]


def test_placeholders_of_a_fill_before_capture_was_allowed_are_captured_over():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, reg, opt = setup()
    reg.capture_allowed = False
    get_optimizer_state_dict(model, opt)  # filled with placeholders: nothing allows a capture yet
    assert reg.missing_anchors(opt) == ["body.weight", "conv.weight"]
    reg.capture_allowed = True  # a fresh run after all: the weights are the pretrained ones
    pretrained = model.body.weight.detach().clone()
    step_with_grads(model, opt)
    assert torch.equal(opt.state[model.body.weight][ANCHOR_KEY], pretrained)
    assert reg.missing_anchors(opt) == [] and reg.pop_metrics()["sp_dist"] == 0.0


def test_ranks_agree_on_the_fill_and_on_missing_anchors():
    """The gradients' check and the missing anchors are summed over ranks (here: another rank that has gradients,
    or a missing anchor, in its shards): a rank whose own shards say otherwise decides as the others do."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, reg, opt = setup(all_reduce=lambda t: t + 1)
    get_optimizer_state_dict(model, opt)  # zero gradients here, not on the other rank: a real step, recorded
    assert reg.pop_metrics() != {}
    assert reg.missing_anchors(opt) == ["(another rank's shard)"]


def test_a_learning_rate_of_none_is_a_step():
    """transformers' Adafactor with its relative step keeps ``lr=None`` in its groups."""
    from transformers.optimization import Adafactor

    model = Net()
    reg = SPRegularizer("l2_sp", alpha=0.5, beta=0.25, split=split_parameters(model, head_modules=["classifier"]))
    reg.capture_allowed = True
    opt = Adafactor(model.parameters(), scale_parameter=True, relative_step=True, warmup_init=True, lr=None)
    reg.prepare_optimizer(opt, model.named_parameters())
    step_with_grads(model, opt, value=1.0)
    assert ANCHOR_KEY in opt.state[model.body.weight] and reg.pop_metrics()["sp_head"] > 0


def _two_anchored_groups(opt):
    """The anchored tensors in two groups (as per-layer learning rates make them)."""
    anchored = next(g for g in opt.param_groups if g["sp_role"] == "anchored")
    second = {**anchored, "params": anchored["params"][1:], "sp_names": anchored["sp_names"][1:], "lr": 0.3}
    anchored["params"], anchored["sp_names"] = anchored["params"][:1], anchored["sp_names"][:1]
    opt.param_groups.append(second)


def _zero3_step(opt, skip=()):
    """DeepSpeed ZeRO-3's step: ``optimizer.step()`` once per group (sub-group), with that group's tensors alone in
    its ``params`` and the other groups' empty; the calls of the groups in ``skip`` skipped (its gradient scaler
    found an overflow there)."""
    saved = [g["params"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["params"] = []
    for i, (g, params) in enumerate(zip(opt.param_groups, saved, strict=True)):
        g["params"] = params
        if i not in skip:
            opt.step()
        g["params"] = []
    for g, params in zip(opt.param_groups, saved, strict=True):
        g["params"] = params


@pytest.mark.parametrize("end_step", [False, True], ids=["bare", "trainer_ends_steps"])
def test_one_step_per_group_as_deepspeed_zero3_steps_is_one_step(end_step):
    """Its calls add up to one record per engine step (the logged values were divided by the number of groups),
    and the first step's capture holds for every group's call (the second anchored group's call raised)."""
    runs = []
    for zero3 in (False, True):
        model, reg, opt = setup(momentum=0.9)
        _two_anchored_groups(opt)
        for step in range(3):
            for p in model.parameters():
                p.grad = torch.full_like(p, 0.1)
            _zero3_step(opt) if zero3 else opt.step()
            if end_step:
                reg.end_step()
            if step == 0:
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.linspace(-1, 1, p.numel()).view(p.shape))
        metrics = reg.pop_metrics()  # one window of three steps
        assert not reg.capture_allowed and reg.missing_anchors(opt) == []
        runs.append(([p.detach().clone() for p in model.parameters()], metrics))
    (plain, plain_metrics), (zero3, zero3_metrics) = runs
    for a, b in zip(plain, zero3, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert zero3_metrics == pytest.approx(plain_metrics, rel=1e-6) and plain_metrics["sp_dist"] > 0


def test_the_fisher_given_is_dropped_once_the_capture_is_final():
    """It lives in the optimizer state from then on, sharded like the parameters: the full copy is not kept."""
    fisher = {n: torch.rand_like(p) + 0.5 for n, p in Net().named_parameters()}
    model, reg, opt = setup("l2_sp_fisher", fisher=fisher)
    step_with_grads(model, opt)
    reg.end_step()
    assert reg.fisher is None and torch.equal(opt.state[model.body.weight]["sp_fisher"], fisher["body.weight"])


def test_a_skipped_call_of_one_group_does_not_shift_the_steps_when_the_trainer_ends_them():
    """DeepSpeed's gradient scaler may skip one sub-group's call: SPTrainer ends each engine step (end_step), so
    the records stay one per step (else the next step's first call would end it, one call late)."""
    model, reg, opt = setup(momentum=0.9)
    _two_anchored_groups(opt)
    for step in range(3):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.1)
        _zero3_step(opt, skip=(0,) if step == 1 else ())
        reg.end_step()
    assert len(reg._records) == 3


def test_bf16_weights_keep_their_fp32_anchors_through_a_load():
    """torch's load_state_dict casts floating state to the parameter's dtype: the anchors are put back as saved."""
    model, reg, opt = setup(dtype=torch.bfloat16, momentum=0.9)
    step_with_grads(model, opt, 0.1)
    saved = opt.state_dict()
    anchor = opt.state[model.body.weight][ANCHOR_KEY]
    assert anchor.dtype == torch.float32
    model, reg, opt = setup(dtype=torch.bfloat16, momentum=0.9)
    reg.capture_allowed = False
    opt.load_state_dict(saved)
    loaded = opt.state[model.body.weight]
    assert loaded[ANCHOR_KEY].dtype == torch.float32 and torch.equal(loaded[ANCHOR_KEY], anchor)
    assert loaded["momentum_buffer"].dtype == torch.bfloat16  # the optimizer's own state as torch loads it
