"""The transfer methods (hf_sp.methods): each one's value or behaviour, and how they compose."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import ALL_METHODS, NUM_CLASSES, RandomImages, make_args, tiny_timm_cnn, tiny_timm_vit, tiny_vit
from torch import nn
from transformers import AutoModelForImageClassification, ResNetConfig, ResNetForImageClassification, TrainerCallback

from hf_sp import SPConfig, SPTrainer
from hf_sp.methods import (
    TransferMethod,
    body_layer_ids,
    build_methods,
    extract_head_inputs,
    fit_linear_probe,
    get_method_info,
    head_linear,
    list_methods,
    register_method,
)
from hf_sp.methods import _base as methods_base
from hf_sp.methods._starts import START_KEY
from hf_sp.models import is_timm_model, wrap_timm_model
from hf_sp.regularizer import ANCHOR_KEY


def tiny_hf_resnet(seed: int = 0) -> ResNetForImageClassification:
    """A transformers ResNet: BatchNorm layers, head ``classifier = Sequential(Flatten, Linear)``."""
    torch.manual_seed(seed)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 12], depths=[1, 1], num_labels=NUM_CLASSES)
    return ResNetForImageClassification(config)


def as_hf(model):
    return wrap_timm_model(model) if is_timm_model(model) else model


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(model, tmp_path, data=None, eval_data=None, **kwargs):
    trainer = SPTrainer(
        model=model,
        args=make_args(tmp_path, **kwargs),
        train_dataset=data if data is not None else RandomImages(),
        eval_dataset=eval_data,
    )
    trainer.train()
    return trainer


# ------------------------------------------------------------------------------------------------ registry, config
def test_registry_lists_the_methods_in_phase_order():
    assert list_methods() == [
        "probe_head", "batchnorm", "learning_rates", "penalty", "spd", "projection", "delta", "bss", "interpolation"
    ]
    with pytest.raises(ValueError, match="Unknown method 'nope'. Known methods: probe_head"):
        get_method_info("nope")


def test_each_field_enables_its_method(tmp_path):
    assert [m.name for m in build_methods(make_args(tmp_path, sp_penalty="none"))] == []
    args = make_args(
        tmp_path,
        sp_head_init="probe",
        sp_batchnorm="frozen",
        sp_body_lr_scale=0.1,
        sp_interpolation_grid=[0.5, 1.0],
        sp_penalty="l2_sp",
        sp_spd=1.0,
        sp_projection="ftp",
        sp_delta=0.1,
        sp_bss=0.01,
    )
    assert args.methods() == list_methods()


def test_recipe_defaults_apply_only_where_unset(tmp_path):
    paper = SPConfig(output_dir=str(tmp_path))
    assert (paper.optim, paper.optim_args, paper.learning_rate, paper.max_grad_norm) == ("sgd", "momentum=0.9", 0.01, 0.0)
    plain = SPConfig(output_dir=str(tmp_path), sp_penalty="none")
    trainer_defaults = SPConfig.__mro__[1]  # TrainingArguments
    reference = trainer_defaults(output_dir=str(tmp_path))
    assert (plain.optim, plain.optim_args, plain.learning_rate, plain.max_grad_norm) == (
        reference.optim,
        reference.optim_args,
        reference.learning_rate,
        reference.max_grad_norm,
    )
    mine = SPConfig(output_dir=str(tmp_path), optim="adamw_torch", learning_rate=3e-4)
    assert (mine.optim, mine.optim_args, mine.learning_rate, mine.max_grad_norm) == ("adamw_torch", None, 3e-4, 0.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sp_head_init": "linear"}, "sp_head_init='linear' is not one of"),
        ({"sp_probe_c_grid": []}, "sp_probe_c_grid must be a non-empty list"),
        ({"sp_batchnorm": "eval"}, "sp_batchnorm='eval' is not one of"),
        ({"sp_batchnorm_affine": "anchored", "sp_penalty": "none"}, "needs a penalty that anchors"),
        ({"sp_body_lr_scale": -1.0}, "sp_body_lr_scale must be a finite number >= 0"),
        ({"sp_layer_decay": 1.5}, "sp_layer_decay must be in \\(0, 1\\]"),
        ({"sp_interpolation_grid": []}, "sp_interpolation_grid must be a non-empty list"),
        ({"sp_penalty": "l3_sp"}, "sp_penalty='l3_sp' is not a known penalty"),
    ],
)
def test_bad_method_settings_name_the_field(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, **kwargs)


def test_settings_that_the_model_cannot_host_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="has no BatchNorm layer"):
        SPTrainer(model=tiny_vit(), args=make_args(tmp_path, sp_batchnorm="frozen"), train_dataset=RandomImages())
    with pytest.raises(ValueError, match="chooses t on the eval split: pass eval_dataset"):
        SPTrainer(model=tiny_vit(), args=make_args(tmp_path, sp_interpolation_grid=[1.0]), train_dataset=RandomImages())


# ------------------------------------------------------------------------------------------------ probe head
def _features(seed=0, n=60, d=5, k=3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g, dtype=torch.float64) * 3
    y = torch.arange(n) % k
    x = centres[y] + torch.randn(n, d, generator=g, dtype=torch.float64) * (1 + torch.arange(d)) + 10
    return x, y


def test_probe_folds_the_standardisation_into_the_layer():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _features()
    probe = fit_linear_probe(x, y, num_classes=3, c_grid=[0.1])
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(x.numpy(), y.numpy())
    logits = (x @ probe.weight.T + probe.bias).numpy()
    np.testing.assert_allclose(logits, reference.decision_function(x.numpy()), rtol=1e-9, atol=1e-9)


def test_probe_strength_is_chosen_on_the_eval_split_or_by_k_fold():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    x, y = _features(0)
    xe, ye = _features(1)
    grid = [1e-4, 1e-2, 1.0]
    probe = fit_linear_probe(x, y, num_classes=3, c_grid=grid, eval_features=xe, eval_labels=ye)
    mu, sd = x.numpy().mean(0), x.numpy().std(0)
    expected = {
        c: float(
            (LogisticRegression(C=c, max_iter=2000).fit((x.numpy() - mu) / sd, y).predict((xe.numpy() - mu) / sd) == ye.numpy()).mean()
        )
        for c in grid
    }
    assert probe.scores == pytest.approx(expected)
    assert max(grid, key=lambda c: (expected[c], -grid.index(c))) == probe.C
    assert probe.selected_on == "eval split"
    kfold = fit_linear_probe(x, y, num_classes=3, c_grid=grid, folds=4)
    assert kfold.selected_on == "4-fold on train"
    z = (x.numpy() - mu) / sd
    splitter = StratifiedKFold(n_splits=4, shuffle=True, random_state=0)
    hits = sum(
        int((LogisticRegression(C=1e-4, max_iter=2000).fit(z[a], y[a]).predict(z[b]) == y.numpy()[b]).sum())
        for a, b in splitter.split(z, y)
    )
    assert kfold.scores[1e-4] == pytest.approx(hits / len(y))


@pytest.mark.parametrize("make_model", [tiny_vit, tiny_timm_cnn, tiny_hf_resnet], ids=["hf_vit", "timm_cnn", "hf_resnet"])
def test_probe_head_is_the_fitted_probe_on_the_frozen_features(tmp_path, make_model):
    data, eval_data = RandomImages(24, seed=0), RandomImages(12, seed=1)
    model = as_hf(make_model())
    trainer = SPTrainer(
        model=model,
        args=make_args(tmp_path, sp_penalty="none", sp_head_init="probe", sp_probe_c_grid=[0.01, 1.0]),
        train_dataset=data,
        eval_dataset=eval_data,
    )
    reference = copy.deepcopy(model)
    trainer.create_optimizer()  # the head is fitted before the first step
    name, linear = head_linear(reference, trainer._sp_context.split.head_modules, NUM_CLASSES)
    loader = trainer._sp_loader(data, 8)
    x, y = extract_head_inputs(reference, linear, loader, progress=False)
    xe, ye = extract_head_inputs(reference, linear, trainer._sp_loader(eval_data, 8), progress=False)
    probe = fit_linear_probe(x, y, num_classes=NUM_CLASSES, c_grid=[0.01, 1.0], eval_features=xe, eval_labels=ye)
    fitted = trainer.model.get_submodule(name)
    torch.testing.assert_close(fitted.weight.double(), probe.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fitted.bias.double(), probe.bias, rtol=1e-6, atol=1e-6)
    # nothing but the head changed
    after = dict(trainer.model.named_parameters())
    for n, p in reference.named_parameters():
        if not n.startswith(name):
            assert torch.equal(after[n], p), n


# ------------------------------------------------------------------------------------------------ BatchNorm
def _bn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("make_model", [tiny_timm_cnn, tiny_hf_resnet], ids=["timm_cnn", "hf_resnet"])
def test_frozen_batchnorm_keeps_the_source_statistics_through_training(tmp_path, make_model):
    model = as_hf(make_model())
    source = copy.deepcopy(model)
    trainer = train(model, tmp_path, sp_batchnorm="frozen", sp_batchnorm_affine="anchored", learning_rate=0.05)
    moved = []
    for before, after in zip(_bn_layers(source), _bn_layers(trainer.model), strict=True):
        assert torch.equal(before.running_mean, after.running_mean)
        assert torch.equal(before.running_var, after.running_var)
        moved.append(not torch.equal(before.weight, after.weight))
    assert sum(moved) > len(moved) / 2  # the affine parameters still train
    # train mode normalises with the running statistics too (Trainer calls model.train() every step)
    x = RandomImages(4, seed=3).x
    trainer.model.train()
    out_train = trainer.model(pixel_values=x).logits
    trainer.model.eval()
    torch.testing.assert_close(out_train, trainer.model(pixel_values=x).logits)
    bn_names = [n for n, p in trainer.model.named_parameters() if ".bn" in n or "norm" in n or "normalization" in n]
    assert set(bn_names) & set(trainer.sp_regularizer.split.anchored)


def test_frozen_batchnorm_model_is_saved_as_a_plain_classifier(tmp_path):
    trainer = train(tiny_hf_resnet(), tmp_path, sp_batchnorm="frozen", sp_batchnorm_affine="frozen")
    trainer.save_model(str(tmp_path / "saved"))
    loaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "saved"))
    assert loaded.state_dict().keys() == trainer.model.state_dict().keys()
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, trainer.model.state_dict()[k])
    frozen = {n for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert frozen and all("normalization" in n for n in frozen)


# ------------------------------------------------------------------------------------------------ learning rates
def test_layer_ids_follow_timm_group_matcher_and_depth_order():
    timm_vit = as_hf(tiny_timm_vit())
    names = [n for n, _ in timm_vit.named_parameters() if not n.startswith("timm_model.head")]
    ids = body_layer_ids(timm_vit, names)
    assert ids["timm_model.patch_embed.proj.weight"] == 0
    assert ids["timm_model.blocks.0.attn.qkv.weight"] == 1
    assert ids["timm_model.norm.weight"] == 1  # timm's matcher puts the final norm with the last block
    hf_vit = tiny_vit()
    names = [n for n, _ in hf_vit.named_parameters() if not n.startswith("classifier")]
    ids = body_layer_ids(hf_vit, names)
    assert ids["vit.embeddings.patch_embeddings.projection.weight"] == 0
    assert ids["vit.layers.0.attention.q_proj.weight"] == 1
    assert ids["vit.layernorm.weight"] == 2


def test_per_role_learning_rates_are_real_group_rates_that_the_scheduler_drives(tmp_path):
    lr, scale, decay = 0.1, 0.5, 0.25
    model = tiny_vit()
    start = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    trainer = train(
        model, tmp_path, sp_penalty="none", learning_rate=lr, sp_body_lr_scale=scale, sp_layer_decay=decay,
        lr_scheduler_type="linear", max_steps=2,
    )
    ids = body_layer_ids(model, [n for n in start if not n.startswith("classifier")])
    expected = {n: lr * (1.0 if n.startswith("classifier") else scale * decay ** (2 - ids[n])) for n in start}
    optimizer = trainer.optimizer.optimizer
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert optimizer.param_groups[0]["sp_lr_scale"] == 1.0  # the head's group first: Trainer logs its rate
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert group["initial_lr"] == pytest.approx(expected[names[id(p)]])
            assert group["lr"] == pytest.approx(0.0)  # the linear schedule reached 0 in every group
    assert trainer.state.log_history[0]["learning_rate"] == pytest.approx(lr)


def test_a_step_moves_each_layer_by_its_own_rate(tmp_path):
    lr, scale, decay = 0.1, 0.5, 0.25
    data = RandomImages()
    model = tiny_vit()
    reference = copy.deepcopy(model).double()
    loss = reference(pixel_values=data.x.double(), labels=data.y).loss
    loss.backward()
    ids = body_layer_ids(reference, [n for n, _ in reference.named_parameters() if not n.startswith("classifier")])
    trainer = train(
        model, tmp_path, data, sp_penalty="none", learning_rate=lr, sp_body_lr_scale=scale, sp_layer_decay=decay,
        max_steps=1,
    )
    after = dict(trainer.model.named_parameters())
    for n, p in reference.named_parameters():
        rate = lr * (1.0 if n.startswith("classifier") else scale * decay ** (2 - ids[n]))
        torch.testing.assert_close(after[n].double(), p - rate * p.grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ interpolation
def test_interpolated_weights_and_buffers_are_on_the_segment_and_t_is_chosen_on_eval(tmp_path):
    data, eval_data = RandomImages(), RandomImages(8, seed=1)
    model = as_hf(tiny_timm_cnn())
    start = state(model)
    plain = train(copy.deepcopy(model), tmp_path / "plain", data, eval_data, learning_rate=0.05)
    end = state(plain.model)
    grid = [0.0, 0.5, 1.0]
    trainer = train(model, tmp_path / "wise", data, eval_data, learning_rate=0.05, sp_interpolation_grid=grid)
    losses = {}
    for t in grid:
        probe = copy.deepcopy(plain.model)
        probe.load_state_dict(
            {k: (start[k] + t * (end[k] - start[k])) if end[k].is_floating_point() else end[k] for k in end}
        )
        losses[t] = SPTrainer(
            model=probe, args=make_args(tmp_path / "eval", sp_penalty="none"), eval_dataset=eval_data
        ).evaluate()["eval_loss"]
    t = min(grid, key=lambda t: (losses[t], -t))
    assert trainer.state.log_history[-1]["sp_interpolation_t"] == t
    for k, v in trainer.model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, start[k] + t * (end[k] - start[k]), rtol=1e-5, atol=1e-6)
    logged = {s: trainer.state.log_history[-1][f"sp_interpolation_eval_loss@{s:g}"] for s in grid}
    assert logged == pytest.approx(losses, rel=1e-5)


def test_interpolation_at_zero_is_the_probe(tmp_path):
    data, eval_data = RandomImages(24), RandomImages(12, seed=1)
    model = as_hf(tiny_timm_cnn())
    trainer = SPTrainer(
        model=model,
        args=make_args(
            tmp_path, sp_head_init="probe", sp_batchnorm="frozen", sp_interpolation_grid=[0.0], learning_rate=0.05
        ),
        train_dataset=data,
        eval_dataset=eval_data,
    )
    reference = copy.deepcopy(model)
    trainer.create_optimizer()
    started = state(trainer.model)  # pretrained body + probe head
    trainer.train()
    for k, v in trainer.model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, started[k], rtol=1e-6, atol=1e-7)
    body = {k: v for k, v in reference.state_dict().items() if not k.startswith("timm_model.fc")}
    assert all(torch.equal(started[k], v) for k, v in body.items())


def test_the_start_lives_in_the_optimizer_state_once(tmp_path):
    trainer = train(
        as_hf(tiny_timm_cnn()), tmp_path, RandomImages(), RandomImages(8, seed=1), sp_interpolation_grid=[1.0]
    )
    optimizer = trainer.optimizer.optimizer
    for p in (p for g in optimizer.param_groups for p in g["params"]):
        keys = set(optimizer.state[p]) & {ANCHOR_KEY, START_KEY}
        assert len(keys) == 1  # the penalty's anchor serves as the start where there is one


# ------------------------------------------------------------------------------------------------ composition
RECIPE = ALL_METHODS


def test_resume_with_every_method_ends_equal_to_an_uninterrupted_run(tmp_path):
    data, eval_data = RandomImages(32), RandomImages(8, seed=1)
    model = as_hf(tiny_timm_cnn())
    kwargs = dict(RECIPE, max_steps=4, per_device_train_batch_size=8, save_strategy="steps", save_steps=2)
    full = train(copy.deepcopy(model), tmp_path / "full", data, eval_data, **kwargs)
    # the same run, interrupted after its first checkpoint, then resumed by a new trainer on the pretrained model
    first = SPTrainer(
        model=copy.deepcopy(model), args=make_args(tmp_path / "cut", **dict(kwargs, max_steps=2)),
        train_dataset=data, eval_dataset=eval_data,
    )
    first.train()
    resumed = SPTrainer(
        model=copy.deepcopy(model), args=make_args(tmp_path / "cut", **kwargs), train_dataset=data,
        eval_dataset=eval_data,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "out" / "checkpoint-2"))
    assert resumed.state.log_history[-1]["sp_interpolation_t"] == full.state.log_history[-1]["sp_interpolation_t"]
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("make_model", [tiny_vit, tiny_timm_cnn], ids=["loss_kwargs", "no_loss_kwargs"])
def test_gradient_accumulation_with_every_method_equals_the_full_batch(tmp_path, make_model):
    recipe = dict(RECIPE)
    if make_model is tiny_vit:
        recipe["sp_batchnorm"] = "train"  # no BatchNorm in a ViT
    data, eval_data = RandomImages(16), RandomImages(8, seed=1)
    model = as_hf(make_model())
    full = train(copy.deepcopy(model), tmp_path / "full", data, eval_data, **recipe)
    accumulated = train(
        model, tmp_path / "ga", data, eval_data, per_device_train_batch_size=8, gradient_accumulation_steps=2, **recipe
    )
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(accumulated.model.state_dict()[k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_bf16_with_every_method_trains_and_keeps_fp32_starts(tmp_path):
    # BatchNorm in train mode: at random init, frozen statistics leave near-constant pooled features, whose folded
    # probe (weight / sigma, bias - weight @ mu) loses its logits to cancellation in bf16.
    # A ViT (no BatchNorm): bf16 training of the random timm CNN diverges in some runs whatever the methods.
    recipe = dict(RECIPE, sp_batchnorm="train")
    trainer = train(tiny_vit(), tmp_path, RandomImages(16), RandomImages(8, seed=1), bf16=True, **recipe)
    optimizer = trainer.optimizer.optimizer
    starts = [s.get(ANCHOR_KEY, s.get(START_KEY)) for s in optimizer.state.values()]
    assert starts and all(t.dtype == torch.float32 for t in starts)
    assert math.isfinite(trainer.state.log_history[-2]["train_loss"])


class _HeadAtStart(TrainerCallback):
    """Records the head as the first step is about to be taken (after the methods' initialize phase)."""

    def __init__(self):
        self.heads = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.heads.append(model.timm_model.fc.weight.detach().clone())


def test_model_init_fits_a_probe_for_each_trial(tmp_path):
    data, eval_data = RandomImages(24), RandomImages(8, seed=1)
    seeds = iter(range(10))
    record = _HeadAtStart()
    trainer = SPTrainer(
        model_init=lambda: as_hf(tiny_timm_cnn(seed=next(seeds))),
        args=make_args(tmp_path, sp_head_init="probe", sp_batchnorm="frozen", sp_penalty="none"),
        train_dataset=data,
        eval_dataset=eval_data,
        callbacks=[record],
    )
    for _ in range(2):
        trainer.train()
    assert len(record.heads) == 2
    assert not torch.equal(record.heads[0], record.heads[1])  # each trial's own model got its own probe
    for head in record.heads:  # and it is the probe, not the random init of that seed
        assert not torch.equal(head, tiny_timm_cnn(seed=1).fc.weight)


def test_model_card_records_the_recipe(tmp_path):
    trainer = train(as_hf(tiny_timm_cnn()), tmp_path, RandomImages(24), RandomImages(8, seed=1), **RECIPE)
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "head initialisation (`sp_head_init`) | `probe`" in card
    assert "BatchNorm statistics (`sp_batchnorm`) | `frozen`" in card
    assert "layer-wise decay (`sp_layer_decay`) | 0.5" in card
    assert "selective projection decay (`sp_spd`) | 1" in card
    assert "projection (`sp_projection`) | `ftp`" in card
    assert "DELTA attention (`sp_delta_attention`) | `loss_drop`" in card
    t = trainer.state.log_history[-1]["sp_interpolation_t"]
    assert f"t = {t:g} chosen on the validation split" in card


# ------------------------------------------------------------------------------------------------ loss terms
class _LogitsSquared(TransferMethod):
    """A loss term for the test: ``c * mean_i ||logits_i||^2`` of the micro-batch."""

    c = 0.3

    @classmethod
    def enabled(cls, args):
        return True

    def loss_term(self, ctx, inputs, outputs):
        return self.c * outputs["logits"].square().sum(dim=1).mean()


@pytest.fixture
def logits_term():
    register_method("test_logits_squared", order=99, description="test only")(_LogitsSquared)
    yield
    del methods_base._METHODS["test_logits_squared"]


@pytest.mark.parametrize("make_model", [tiny_vit, tiny_timm_vit], ids=["loss_kwargs", "no_loss_kwargs"])
def test_a_loss_term_is_exact_under_gradient_accumulation(tmp_path, logits_term, make_model):
    data = RandomImages(16)
    model = as_hf(make_model())
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        out = reference(pixel_values=data.x, labels=data.y)
        (out.loss + _LogitsSquared.c * out.logits.square().sum(1).mean()).backward()
        opt.step()
    accumulated = train(
        model, tmp_path, data, sp_penalty="none", max_steps=2, per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
    )
    for n, p in reference.named_parameters():
        torch.testing.assert_close(dict(accumulated.model.named_parameters())[n], p, rtol=1e-4, atol=1e-6, msg=n)
