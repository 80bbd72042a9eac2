"""The paper's successors (SPD, projection to a radius / FTP, DELTA, BSS): each one against a hand-written float64
transcription of its formula (or of the authors' algorithm), and its behaviour under resume and accumulation.

The composition with the other methods (resume, gradient accumulation, bf16, DDP, model_init, model card) runs
through ``ALL_METHODS`` (tests/conftest.py), which enables SPD, FTP and DELTA.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import RandomImages, make_args, tiny_timm_cnn, tiny_vit

from hf_sp import SPConfig, SPTrainer
from hf_sp.methods import batch_spectral_shrinkage
from hf_sp.models import is_timm_model, wrap_timm_model
from hf_sp.selection import split_parameters

LR, STEPS = 0.1, 6
SGD_MOMENTUM = dict(optim="sgd", optim_args="momentum=0.9", learning_rate=LR, max_steps=STEPS, sp_penalty="none")


def as_hf(model):
    return wrap_timm_model(model) if is_timm_model(model) else model


def run(model, tmp_path, data, **kwargs) -> SPTrainer:
    trainer = SPTrainer(model=model, args=make_args(tmp_path, **kwargs), train_dataset=data)
    trainer.train()
    return trainer


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(got: dict, expected: dict, rtol=1e-10, atol=1e-12):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=name)


def reference_sgd(model, data, steps, after_step, before_step=None, extra_loss=None):
    """Full-batch SGD with momentum 0.9 on the mean cross-entropy (+ ``extra_loss``), with the method's own work
    around each step, written out here: the transcription every test below compares against."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    params = dict(model.named_parameters())
    w0 = {n: p.detach().clone() for n, p in params.items()}
    for step in range(steps):
        opt.zero_grad()
        out = model(pixel_values=data.x, labels=data.y)
        loss = out.loss + (extra_loss(model, data) if extra_loss else 0.0)
        loss.backward()
        with torch.no_grad():
            context = before_step(params, w0) if before_step else None
        opt.step()
        with torch.no_grad():
            after_step(params, w0, context, step)
    return weights(model)


# ------------------------------------------------------------------------------------------------ SPD
def test_spd_is_the_authors_rule_after_the_optimizer_step(tmp_path):
    model, data = tiny_vit().double(), RandomImages(dtype=torch.float64)
    anchored = split_parameters(model).anchored
    lam = 1.0

    def before(params, w0):  # c = -<g, w - w0> and ||w - w0||, before the step
        return {
            n: float((params[n] - w0[n]).norm())
            for n in anchored
            if -float((params[n].grad * (params[n] - w0[n])).sum()) < 0
        }

    def after(params, w0, selected, step):
        for n, previous in selected.items():
            new = params[n]
            current = float((new - w0[n]).norm())
            ratio = min(max((current - previous) / current, 0.0), 1.0)
            new.copy_(new - lam * ratio * (new - w0[n]))

    expected = reference_sgd(model, data, STEPS, after, before)
    got = weights(run(copy.deepcopy(model), tmp_path / "spd", data, sp_spd=lam, **SGD_MOMENTUM).model)
    assert_same(got, expected)
    plain = weights(run(copy.deepcopy(model), tmp_path / "plain", data, **SGD_MOMENTUM).model)
    assert max(float((got[n] - plain[n]).abs().max()) for n in anchored) > 1e-4  # it acted


# ------------------------------------------------------------------------------------------------ projection
@pytest.mark.parametrize("norm", ["l2", "mars"])
def test_fixed_projection_keeps_each_layer_in_its_ball(tmp_path, norm):
    model, data = tiny_vit().double(), RandomImages(dtype=torch.float64)
    anchored = split_parameters(model).anchored
    rho, rho_patch = 0.002, 0.0005  # every layer, and the patch embedding by its own pattern

    def radius(n, w0):
        r = rho_patch if "patch_embeddings" in n else rho
        return r * (w0.norm() if norm == "l2" else w0.abs().reshape(w0.shape[0], -1).sum(1).max())

    def after(params, w0, _, step):
        for n in anchored:
            d, gamma = params[n] - w0[n], radius(n, w0[n])
            if norm == "l2":
                if d.norm() > gamma:
                    params[n].copy_(w0[n] + d * gamma / d.norm())
            else:
                for r in range(d.shape[0]):
                    row = d[r].abs().sum()
                    if row > gamma:
                        params[n][r] = w0[n][r] + d[r] * gamma / row

    expected = reference_sgd(model, data, STEPS, after)
    trainer = run(
        copy.deepcopy(model), tmp_path, data, sp_projection="fixed", sp_projection_norm=norm,
        sp_projection_radius=rho, sp_projection_radii=["*patch_embeddings*=0.0005"], **SGD_MOMENTUM,
    )
    got = weights(trainer.model)
    assert_same(got, expected)
    start = weights(model)
    on_boundary = 0
    for n in anchored:
        d, gamma = got[n] - start[n], float(radius(n, start[n]))
        size = float(d.norm()) if norm == "l2" else float(d.abs().reshape(d.shape[0], -1).sum(1).max())
        assert size <= gamma * (1 + 1e-9)
        on_boundary += abs(size - gamma) < 1e-9 * gamma
    assert on_boundary >= len(anchored) // 2  # the constraint was active


def test_ftp_is_the_authors_algorithm(tmp_path):
    model, data = tiny_vit().double(), RandomImages(dtype=torch.float64)
    anchored = split_parameters(model, include="all").anchored  # vectors too (biases, norms)
    assert any(dict(model.named_parameters())[n].dim() == 1 for n in anchored)
    k, mu, b1, b2 = 0.5, 1e-2, 0.9, 0.999
    # GT-RIPL/FTP util/FTP.py, written out: buffers per layer (gamma, moments, previous c and 1 / norms)
    buffers = {n: {"gamma": None, "m": 0.0, "v": 0.0, "c": None, "scale": None} for n in anchored}

    def after(params, w0, _, step):
        t = step + 1
        for n in anchored:
            p, b = params[n], buffers[n]
            c = p - w0[n]
            norms = torch.sum(torch.abs(c), dim=tuple(range(1, c.dim())), keepdim=True) + 1e-8  # _mars_norm, as written
            if t == 1:
                gamma = torch.tensor(1e-8, dtype=c.dtype)
            else:
                grad = float((p.grad * b["c"] * b["scale"]).sum())
                if grad > 0:
                    grad *= k
                b["m"] = b1 * b["m"] + (1 - b1) * grad
                b["v"] = b2 * b["v"] + (1 - b2) * grad**2
                m_hat, v_hat = b["m"] / (1 - b1**t), b["v"] / (1 - b2**t)
                gamma = b["gamma"] - mu * m_hat / (v_hat**0.5 + 1e-8)
                gamma = torch.clamp(torch.as_tensor(gamma, dtype=c.dtype), 1e-8, norms.max())
            p.copy_(w0[n] + torch.clamp(gamma / norms, 0, 1) * c)
            b.update(gamma=gamma, c=c.clone(), scale=1 / norms)

    expected = reference_sgd(model, data, STEPS, after)
    trainer = run(copy.deepcopy(model), tmp_path, data, sp_projection="ftp", sp_ftp_k=k, sp_ftp_lr=mu, sp_include="all",
                  **SGD_MOMENTUM)
    assert_same(weights(trainer.model), expected)
    gammas = [float(buffers[n]["gamma"]) for n in anchored]
    assert sum(g > 1e-3 for g in gammas) >= len(gammas) // 2  # the radii grew from 1e-8 (some, as the loss asked)


# ------------------------------------------------------------------------------------------------ BSS
def test_bss_value_and_gradient_are_the_smallest_singular_values():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    value = batch_spectral_shrinkage(features, k=2)
    u, s, vt = np.linalg.svd(features.detach().numpy(), full_matrices=False)
    assert float(value.detach()) == pytest.approx(float(s[-1] ** 2 + s[-2] ** 2), rel=1e-12)
    value.backward()
    expected = sum(2 * s[i] * np.outer(u[:, i], vt[i]) for i in (-1, -2))  # d sigma_i^2 / dF = 2 sigma_i u_i v_i^T
    np.testing.assert_allclose(features.grad.numpy(), expected, rtol=1e-9, atol=1e-12)


def pooled(model, data):
    """The head's input of the tiny ViT: the final layer-normed CLS token."""
    hidden = model.vit(pixel_values=data.x).last_hidden_state
    return hidden[:, 0]


def test_bss_trains_on_the_loss_plus_its_term(tmp_path):
    model, data = tiny_vit().double(), RandomImages(dtype=torch.float64)
    eta, k = 0.05, 2

    def term(m, d):
        s = torch.linalg.svdvals(pooled(m, d))
        return eta * s[-k:].square().sum()

    expected = reference_sgd(model, data, STEPS, lambda *a: None, extra_loss=term)
    trainer = run(copy.deepcopy(model), tmp_path, data, sp_bss=eta, sp_bss_k=k, **SGD_MOMENTUM)
    assert_same(weights(trainer.model), expected)
    assert trainer.state.log_history[0]["sp_bss_value"] > 0


def test_bss_under_accumulation_shrinks_each_micro_batch(tmp_path):
    # The term is the micro-batch's: with 2 micro-batches of 8, the step follows the full-batch loss plus the mean
    # of the two micro-batches' terms (the spectrum of a batch is not the mean of its halves').
    model, data = tiny_vit().double(), RandomImages(dtype=torch.float64)
    eta = 0.05

    def term(m, d):
        halves = [RandomImages(dtype=torch.float64) for _ in range(2)]
        for h, sl in zip(halves, (slice(0, 8), slice(8, 16)), strict=True):
            h.x, h.y = d.x[sl], d.y[sl]
        return eta * sum(torch.linalg.svdvals(pooled(m, h))[-1:].square().sum() for h in halves) / 2

    expected = reference_sgd(model, data, 3, lambda *a: None, extra_loss=term)
    kwargs = dict(SGD_MOMENTUM, max_steps=3, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                  train_sampling_strategy="sequential")  # micro-batches = the two halves, in order
    trainer = run(copy.deepcopy(model), tmp_path, data, sp_bss=eta, **kwargs)
    assert_same(weights(trainer.model), expected, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------------------------------ DELTA
def feature_maps(model, names, data):
    maps = {}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda m, i, o, n=n: maps.__setitem__(n, o[0] if isinstance(o, tuple) else o))
        for n in names
    ]
    try:
        model(pixel_values=data.x)
    finally:
        for h in handles:
            h.remove()
    return maps


def delta_omega(live, source, attention):
    """``1/B sum_i sum_j C_j / (2 S_j) sum_c a_jc ||FM_jc - FM0_jc||^2``, channels at dim 1 (maps) or last (tokens)."""
    total = 0.0
    for name, a in attention.items():
        d = live[name] - source[name]
        if d.dim() == 3:  # B x N x C tokens
            d = d.transpose(1, 2)
        b, c = d.shape[:2]
        s = d[0, 0].numel()
        total = total + (c / (2 * s)) * torch.einsum("c,bc->", a, d.reshape(b, c, -1).square().sum(2)) / b
    return total


@pytest.mark.parametrize("make_model", [tiny_vit, tiny_timm_cnn], ids=["hf_vit_tokens", "timm_cnn_maps"])
def test_delta_unweighted_trains_on_the_feature_map_distance(tmp_path, make_model):
    model, data = as_hf(make_model()).double(), RandomImages(dtype=torch.float64)
    alpha = 0.5
    trainer = run(copy.deepcopy(model), tmp_path / "probe", data, sp_delta=alpha, sp_delta_attention="none",
                  **dict(SGD_MOMENTUM, max_steps=1))
    layers = next(m for m in trainer.sp_methods if m.name == "delta").layers
    assert len(layers) >= 1
    source = copy.deepcopy(model).eval()

    def term(m, d):
        live = feature_maps(m, layers, d)
        with torch.no_grad():
            fixed = feature_maps(source, layers, d)
        channels = {n: fixed[n].shape[-1 if fixed[n].dim() == 3 else 1] for n in layers}
        attention = {n: torch.full((c,), 1.0 / c, dtype=torch.float64) for n, c in channels.items()}
        return alpha * delta_omega(live, fixed, attention)

    expected = reference_sgd(model, data, STEPS, lambda *a: None, extra_loss=term)
    trainer = run(copy.deepcopy(model), tmp_path / "delta", data, sp_delta=alpha, sp_delta_attention="none",
                  **SGD_MOMENTUM)
    assert_same(weights(trainer.model), expected)
    values = [h["sp_delta_value"] for h in trainer.state.log_history if "sp_delta_value" in h]
    assert values[-1] > 0 and values[-1] != values[0]
    if make_model is tiny_vit:  # zero at the start; with BatchNorm in train mode, batch and source statistics differ
        assert values[0] == 0.0


def test_delta_attention_is_the_loss_increase_without_each_channel(tmp_path):
    model, data = as_hf(tiny_timm_cnn()).double(), RandomImages(dtype=torch.float64)
    layer = "timm_model.conv1.3"  # a convolution without bias: zeroing a channel = zeroing its filter
    trainer = run(
        model, tmp_path, data, sp_head_init="probe", sp_delta=0.1, sp_delta_layers=[layer],
        sp_delta_attention_batches=2, per_device_train_batch_size=8, max_steps=1, sp_penalty="none",
    )
    delta = next(m for m in trainer.sp_methods if m.name == "delta")
    start = copy.deepcopy(delta.source).eval()  # the network at its start: pretrained body, probe head
    conv = start.get_submodule(layer)
    assert conv.bias is None
    drops = np.zeros(conv.out_channels)
    with torch.no_grad():
        for sl in (slice(0, 8), slice(8, 16)):
            x, y = data.x[sl], data.y[sl]
            base = float(start(pixel_values=x, labels=y).loss)
            for c in range(conv.out_channels):
                saved = conv.weight[c].clone()
                conv.weight[c] = 0
                drops[c] += float(start(pixel_values=x, labels=y).loss) - base
                conv.weight[c] = saved
    drops /= 2
    z = (drops - drops.mean()) / drops.std()
    expected = np.exp(z / 5) / np.exp(z / 5).sum()
    np.testing.assert_allclose(delta.attention[0].double().numpy(), expected, rtol=1e-6)
    assert expected.std() > 1e-3  # the channels are not all alike


def test_delta_source_stays_in_eval_mode_and_out_of_the_model(tmp_path):
    trainer = run(as_hf(tiny_timm_cnn()), tmp_path, RandomImages(), sp_delta=0.1, sp_delta_attention="none",
                  max_steps=2)
    delta = next(m for m in trainer.sp_methods if m.name == "delta")
    assert not delta.source.training and not any(p.requires_grad for p in delta.source.parameters())
    assert all(p is not q for p in trainer.model.parameters() for q in delta.source.parameters())
    assert all(m is not delta.source for m in trainer.model.modules())  # not a submodule: Trainer's train() misses it


# ------------------------------------------------------------------------------------------------ errors, resume
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sp_spd=-1.0), "sp_spd must be"),
        (dict(sp_projection="fixed"), "needs radii"),
        (dict(sp_projection="ftp", sp_projection_radius=0.1), "learns its radii"),
        (dict(sp_projection="ftp", sp_projection_norm="l2"), "MARS norm"),
        (dict(sp_projection="box", sp_projection_radius=0.1), "not one of"),
        (dict(sp_projection="fixed", sp_projection_radii=["blocks*"]), "pattern=radius"),
        (dict(sp_delta=0.1), "sp_head_init='probe'"),
        (dict(sp_delta=0.1, sp_delta_attention="none", sp_delta_attention_batches=0), "sp_delta_attention_batches"),
        (dict(sp_bss=0.1, sp_bss_k=64), "per_device_train_batch_size"),
    ],
)
def test_bad_successor_settings_name_the_field(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SPConfig(output_dir=str(tmp_path), report_to=[], **kwargs)


def test_unknown_delta_layer_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="no module 'timm_model.nowhere'"):
        SPTrainer(
            model=tiny_timm_cnn(),
            args=make_args(tmp_path, sp_delta=0.1, sp_delta_attention="none", sp_delta_layers=["timm_model.nowhere"]),
            train_dataset=RandomImages(),
        )


@pytest.mark.parametrize(
    "extra",
    [
        dict(sp_projection="fixed", sp_projection_radius=0.01, sp_projection_norm="mars"),
        dict(sp_bss=0.05, sp_spd=1.0),
        dict(sp_head_init="probe", sp_delta=0.1, sp_projection="ftp"),
    ],
    ids=["fixed_projection", "bss_spd", "delta_ftp"],
)
def test_resume_ends_equal_to_an_uninterrupted_run(tmp_path, extra):
    data = RandomImages(32)
    model = as_hf(tiny_timm_cnn())
    kwargs = dict(SGD_MOMENTUM, max_steps=4, per_device_train_batch_size=8, save_strategy="steps", save_steps=2, **extra)
    full = run(copy.deepcopy(model), tmp_path / "full", data, **kwargs)
    run(copy.deepcopy(model), tmp_path / "cut", data, **dict(kwargs, max_steps=2))
    resumed = SPTrainer(model=copy.deepcopy(model), args=make_args(tmp_path / "cut", **kwargs), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "out" / "checkpoint-2"))
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_starts_keep_their_precision_through_a_checkpoint_of_bf16_weights():
    # torch's Optimizer.load_state_dict casts floating state to the parameter's dtype; the starts must stay fp32
    from hf_sp.methods._starts import START_KEY, StartTracker

    p = torch.nn.Parameter(torch.randn(5, dtype=torch.bfloat16))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    StartTracker.of(opt)
    p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.state_dict()
    assert opt.state[p][START_KEY].dtype == torch.float32
    fresh = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    StartTracker.of(fresh)
    fresh.load_state_dict(saved)
    assert fresh.state[p][START_KEY].dtype == torch.float32
    assert fresh.state[p]["momentum_buffer"].dtype == torch.bfloat16  # torch's own state as torch loads it
    plain = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    plain.load_state_dict(saved)
    assert plain.state[p][START_KEY].dtype == torch.bfloat16  # what the tracker prevents


def test_the_start_tracker_does_not_keep_its_optimizer_alive():
    import gc
    import weakref

    from hf_sp.methods._starts import StartTracker

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    StartTracker.of(opt)
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None


def test_resume_without_the_methods_state_is_refused(tmp_path):
    data = RandomImages(32)
    model = as_hf(tiny_timm_cnn())
    kwargs = dict(SGD_MOMENTUM, max_steps=4, per_device_train_batch_size=8, save_strategy="steps", save_steps=2)
    run(copy.deepcopy(model), tmp_path, data, **dict(kwargs, max_steps=2))  # plain fine-tuning
    resumed = SPTrainer(
        model=copy.deepcopy(model), args=make_args(tmp_path, sp_spd=1.0, **kwargs), train_dataset=data
    )
    with pytest.raises(ValueError, match="without their start recorded: it was not written with sp_spd"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


def test_the_command_line_takes_every_successor_field():
    from hf_sp.finetune import build_parser

    argv = ["--output_dir", "out", "--model_name_or_path", "packaged:tf_efficientnet_lite0", "--report_to", "none",
            "--sp_spd", "1", "--sp_projection", "fixed", "--sp_projection_norm", "mars", "--sp_projection_radius",
            "0.05", "--sp_projection_radii", "*conv*=0.1", "blocks*=0.2", "--sp_ftp_k", "0.5", "--sp_ftp_lr", "0.02",
            "--sp_delta", "0.1", "--sp_delta_attention", "none", "--sp_delta_layers", "a", "b",
            "--sp_delta_attention_batches", "3", "--sp_bss", "0.001", "--sp_bss_k", "2"]
    args = build_parser().parse_args_into_dataclasses(argv)[2]
    assert (args.sp_spd, args.sp_projection, args.sp_projection_norm, args.sp_projection_radius) == (1.0, "fixed", "mars", 0.05)
    assert args.sp_projection_radii == ["*conv*=0.1", "blocks*=0.2"] and (args.sp_ftp_k, args.sp_ftp_lr) == (0.5, 0.02)
    assert (args.sp_delta, args.sp_delta_attention, args.sp_delta_layers, args.sp_delta_attention_batches) == (
        0.1, "none", ["a", "b"], 3)
    assert (args.sp_bss, args.sp_bss_k) == (0.001, 2)
    assert args.methods() == ["penalty", "spd", "projection", "delta", "bss"]  # with the default sp_penalty
