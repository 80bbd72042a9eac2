"""SPTrainer end to end: the trained weights equal a hand-written loop with the paper's objective."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import timm
import torch
from conftest import TINY_TIMM_VIT_ARGS, RandomImages, make_args, tiny_timm_cnn, tiny_timm_vit, tiny_vit
from formulas import penalty_formula
from transformers import AutoModelForImageClassification, TrainerCallback

from hf_sp import SPTrainer, list_penalties, save_fisher, split_parameters
from hf_sp.models import is_timm_model, wrap_timm_model
from hf_sp.regularizer import ANCHOR_KEY, MissingAnchorError


def as_hf(model):
    return wrap_timm_model(model) if is_timm_model(model) else model


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def reference_run(model, data, *, penalty, alpha, beta, lr, steps, fisher=None, mode="gradient"):
    """Full-batch SGD on loss + alpha * Omega(w_S) + beta/2 ||w_Sbar||^2, written out by hand."""
    model = as_hf(copy.deepcopy(model))
    split = split_parameters(model)
    named = dict(model.named_parameters())
    w0 = {n: named[n].detach().clone() for n in split.anchored}
    x, y = data.x, data.y
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = model(pixel_values=x, labels=y).loss
        body = [named[n] for n in split.anchored]
        anchors = [w0[n] for n in split.anchored]
        fishers = [fisher[n] for n in split.anchored] if fisher else [torch.ones_like(t) for t in anchors]
        if mode == "gradient":
            loss = loss + alpha * penalty_formula(penalty, body, anchors, fishers)
            loss = loss + beta / 2 * sum((named[n] ** 2).sum() for n in split.new)
            loss.backward()
        else:
            loss.backward()
            grads = torch.autograd.grad(penalty_formula(penalty, body, anchors, fishers), body)
            with torch.no_grad():
                for p, g in zip(body, grads, strict=True):
                    p.sub_(lr * alpha * g)
                for n in split.new:
                    named[n].mul_(1 - lr * beta)
        opt.step()
    return params(model)


PENALTIES = [name for name in list_penalties() if name != "none"]


@pytest.mark.parametrize("make_model", [tiny_vit, tiny_timm_vit], ids=["hf_vit", "timm_vit"])
@pytest.mark.parametrize("penalty", PENALTIES)
def test_training_equals_the_papers_objective(tmp_path, make_model, penalty):
    # float64 throughout, so that the comparison is tight even where group lasso is non-smooth
    model, data = make_model().double(), RandomImages(dtype=torch.float64)
    fisher = None
    extra = {}
    if penalty == "l2_sp_fisher":
        split = split_parameters(as_hf(model))
        g = torch.Generator().manual_seed(3)
        fisher = {n: torch.rand(s, generator=g).double() for n, s in split.shapes.items()}  # fp32-exact
        fisher = {n: f for n, f in fisher.items() if n in split.anchored}
        save_fisher(fisher, tmp_path / "fisher.safetensors")
        extra["sp_fisher_path"] = str(tmp_path / "fisher.safetensors")
    expected = reference_run(model, data, penalty=penalty, alpha=0.3, beta=0.2, lr=0.05, steps=3, fisher=fisher)
    args = make_args(tmp_path, sp_penalty=penalty, sp_alpha=0.3, sp_beta=0.2, **extra)
    trainer = SPTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    got = params(trainer.model)
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)
    # and the run did move: a regularizer that did nothing would fail the comparison for penalty != none
    moved = max(float((got[n] - p).abs().max()) for n, p in params(as_hf(make_model())).items())
    assert moved > 1e-3


@pytest.mark.parametrize("penalty", ["l2_sp", "l1_sp"])
def test_compiled_step_trains_the_papers_objective(tmp_path, penalty, fresh_compiler, monkeypatch):
    """sp_compile=True: the same float64 training as the hand-written loop, through the compiled step."""
    from hf_sp.penalties import _compiled

    blocks_per_call = []
    compile_step = _compiled.compile_step

    def counting():
        step = compile_step()

        def counted(penalty, w, *args):
            blocks_per_call.append(len(w))
            return step(penalty, w, *args)

        return counted

    monkeypatch.setattr(_compiled, "compile_step", counting)
    model, data = tiny_vit().double(), RandomImages(dtype=torch.float64)
    expected = reference_run(model, data, penalty=penalty, alpha=0.3, beta=0.2, lr=0.05, steps=3)
    args = make_args(tmp_path, sp_penalty=penalty, sp_alpha=0.3, sp_beta=0.2, sp_compile=True)
    graphs = fresh_compiler()
    trainer = SPTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert fresh_compiler() > graphs
    # the compiler check runs one block; each of the 3 steps runs the anchored tensors' blocks
    assert sum(n > 1 for n in blocks_per_call) == 3
    for name, value in params(trainer.model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_compile_is_refused_for_a_group_penalty_and_a_missing_compiler_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="sp_compile=True needs an elementwise penalty.*group_lasso_sp"):
        make_args(tmp_path, sp_penalty="group_lasso_sp", sp_compile=True)

    from hf_sp.penalties import _compiled

    def no_compiler(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(_compiled, "compile_step", lambda: no_compiler)
    args = make_args(tmp_path, sp_compile=True)
    with pytest.raises(RuntimeError, match="sp_compile=True needs a working torch.compile.*sp_compile=False"):
        SPTrainer(model=tiny_vit(), args=args, train_dataset=RandomImages()).train()


def test_decoupled_mode_steps_toward_w0_beside_the_optimizer(tmp_path):
    model, data = tiny_vit(), RandomImages()
    expected = reference_run(model, data, penalty="l2_sp", alpha=0.5, beta=0.2, lr=0.05, steps=3, mode="decoupled")
    args = make_args(tmp_path, sp_alpha=0.5, sp_beta=0.2, sp_mode="decoupled")
    trainer = SPTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    for name, value in params(trainer.model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("make_model", [tiny_vit, tiny_timm_vit], ids=["loss_kwargs", "no_loss_kwargs"])
def test_gradient_accumulation_is_exact(tmp_path, make_model):
    runs = {}
    for ga in (1, 2):
        model = make_model()
        args = make_args(
            tmp_path / f"ga{ga}",
            per_device_train_batch_size=8 // ga,
            gradient_accumulation_steps=ga,
            max_steps=4,
            sp_alpha=1.0,
            sp_beta=0.5,
            learning_rate=0.1,
        )
        trainer = SPTrainer(model=model, args=args, train_dataset=RandomImages())
        trainer.train()
        runs[ga] = params(trainer.model)
    for name in runs[1]:
        torch.testing.assert_close(runs[2][name], runs[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_anchor_is_one_fp32_copy_of_the_pretrained_anchored_tensors(tmp_path):
    model = tiny_timm_cnn()
    start = params(as_hf(model))
    trainer = SPTrainer(
        model=model, args=make_args(tmp_path, per_device_train_batch_size=4), train_dataset=RandomImages()
    )
    trainer.train()
    reg = trainer.sp_regularizer
    optimizer = trainer.optimizer.optimizer
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    anchors = {names[id(p)]: s[ANCHOR_KEY] for p, s in optimizer.state.items() if ANCHOR_KEY in s}
    assert sorted(anchors) == sorted(reg.split.anchored)
    for name, anchor in anchors.items():
        assert anchor.dtype == torch.float32
        assert torch.equal(anchor, start[name]), name
        assert not torch.equal(anchor, trainer.model.get_parameter(name).detach()), "weights should have moved"
    assert not reg._pending and reg.fisher is None
    anchor_bytes = sum(a.numel() * a.element_size() for a in anchors.values())
    expected = sum(math.prod(reg.split.shapes[n]) for n in reg.split.anchored) * 4
    assert anchor_bytes == expected


def test_second_train_call_keeps_the_original_anchor(tmp_path):
    model = tiny_vit()
    start = params(model)
    trainer = SPTrainer(model=model, args=make_args(tmp_path), train_dataset=RandomImages())
    trainer.train()
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    for name in trainer.sp_regularizer.split.anchored:
        p = trainer.model.get_parameter(name)
        assert torch.equal(optimizer.state[p][ANCHOR_KEY], start[name])


def test_a_new_trainer_on_an_already_fine_tuned_model_is_refused(tmp_path):
    model = tiny_vit()
    SPTrainer(model=model, args=make_args(tmp_path / "a"), train_dataset=RandomImages()).train()
    again = SPTrainer(model=model, args=make_args(tmp_path / "b"), train_dataset=RandomImages())
    with pytest.raises(MissingAnchorError, match="already fine-tuned"):
        again.train()


def test_model_init_reanchors_each_trial_on_its_fresh_model(tmp_path):
    """hyperparameter_search calls train() with model_init for each trial: each trial anchors on its new model."""
    seeds = itertools.count(1)
    made = []

    def model_init():
        model = tiny_vit(seed=next(seeds))
        made.append(params(model))
        return model

    trainer = SPTrainer(model_init=model_init, args=make_args(tmp_path), train_dataset=RandomImages())
    anchors = []
    for _ in range(2):
        trainer.train()
        optimizer = trainer.optimizer.optimizer
        name = trainer.sp_regularizer.split.anchored[0]
        anchor = optimizer.state[trainer.model.get_parameter(name)][ANCHOR_KEY]
        assert torch.equal(anchor, made[-1][name])
        anchors.append(anchor)
    assert not torch.equal(anchors[0], anchors[1])


def test_resume_ends_equal_to_an_uninterrupted_run(tmp_path):
    common = dict(
        max_steps=6,
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=3,
        optim="adamw_torch",
        sp_alpha=1.0,
        learning_rate=0.05,
        lr_scheduler_type="linear",
    )
    full = SPTrainer(model=tiny_vit(), args=make_args(tmp_path / "a", **common), train_dataset=RandomImages(n=24))
    full.train()
    # As a new process would: a new pretrained model object, resumed from the run's step-3 checkpoint.
    again = SPTrainer(model=tiny_vit(), args=make_args(tmp_path / "b", **common), train_dataset=RandomImages(n=24))
    again.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-3"))
    start = params(tiny_vit())
    for name, value in params(full.model).items():
        torch.testing.assert_close(params(again.model)[name], value, rtol=0, atol=1e-6, msg=name)
    optimizer = again.optimizer.optimizer
    for name in again.sp_regularizer.split.anchored:
        assert torch.equal(optimizer.state[again.model.get_parameter(name)][ANCHOR_KEY], start[name])


def test_resume_from_a_checkpoint_without_anchor_is_refused(tmp_path):
    plain = make_args(tmp_path, sp_penalty="none", save_strategy="steps", save_steps=2, max_steps=2)
    SPTrainer(model=tiny_vit(), args=plain, train_dataset=RandomImages()).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert checkpoint.is_dir()
    trainer = SPTrainer(model=tiny_vit(), args=make_args(tmp_path, max_steps=4), train_dataset=RandomImages())
    with pytest.raises(MissingAnchorError, match="no starting-point anchor"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


class Recorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


class DistanceAtStepStart(TrainerCallback):
    """||w_S - w0_S|| and ||w_Sbar||^2 at the start of each step, where the penalty is evaluated."""

    def __init__(self, start, anchored, new):
        self.start, self.anchored, self.new, self.dist, self.head = start, anchored, new, [], []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        now = params(model)
        self.dist.append(math.sqrt(sum(float(((now[n] - self.start[n]) ** 2).sum()) for n in self.anchored)))
        self.head.append(sum(float((now[n] ** 2).sum()) for n in self.new))


def test_penalty_and_distance_are_logged_as_window_averages(tmp_path):
    recorder = Recorder()
    args = make_args(tmp_path, max_steps=4, logging_steps=2, sp_alpha=0.4, sp_beta=0.2, learning_rate=0.2)
    model = tiny_vit()
    split = split_parameters(model)
    probe = DistanceAtStepStart(params(model), split.anchored, split.new)
    trainer = SPTrainer(model=model, args=args, train_dataset=RandomImages(), callbacks=[recorder, probe])
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    # every report_to backend is a callback fed by on_log: the recorder sees the same values
    assert [r["sp_dist"] for r in recorder.logs if "loss" in r] == [h["sp_dist"] for h in logged]
    assert probe.dist[0] == 0.0
    for window, entry in enumerate(logged):
        steps = slice(2 * window, 2 * window + 2)
        dists, heads = probe.dist[steps], probe.head[steps]
        assert entry["sp_dist"] == pytest.approx(sum(dists) / 2, rel=1e-5)
        assert entry["sp_body"] == pytest.approx(0.4 * sum(0.5 * d**2 for d in dists) / 2, rel=1e-5)
        assert entry["sp_head"] == pytest.approx(0.2 * sum(0.5 * h for h in heads) / 2, rel=1e-5)


def test_weight_decay_does_not_stack_on_the_penalty(tmp_path):
    with pytest.raises(ValueError, match=r"weight_decay=0.01 .*Set weight_decay=0.0"):
        make_args(tmp_path, weight_decay=0.01)
    make_args(tmp_path, weight_decay=0.01, sp_penalty="none")  # plain Trainer behaviour is allowed


def test_bf16_autocast_keeps_anchor_and_penalty_in_fp32(tmp_path):
    model = tiny_vit()
    start = params(model)
    args = make_args(tmp_path, bf16=True, optim="adamw_torch")
    trainer = SPTrainer(model=model, args=args, train_dataset=RandomImages())
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    for name in trainer.sp_regularizer.split.anchored:
        anchor = optimizer.state[trainer.model.get_parameter(name)][ANCHOR_KEY]
        assert anchor.dtype == torch.float32 and torch.equal(anchor, start[name])
    assert all(math.isfinite(h["sp_dist"]) for h in trainer.state.log_history if "sp_dist" in h)


class Diverge(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 3:
            with torch.no_grad():
                model.get_parameter("vit.embeddings.patch_embeddings.projection.weight").fill_(float("nan"))


def test_non_finite_penalty_stops_training_and_keeps_the_last_checkpoint(tmp_path):
    args = make_args(tmp_path, max_steps=8, save_strategy="steps", save_steps=2, logging_steps=1)
    trainer = SPTrainer(model=tiny_vit(), args=args, train_dataset=RandomImages(), callbacks=[Diverge()])
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer.train()
    out = tmp_path / "out"
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    assert not (out / "checkpoint-4").exists()


def test_head_found_when_class_count_equals_the_source(tmp_path):
    """Same number of classes: nothing is 'mismatched', yet the classifier is still the new head."""
    trainer = SPTrainer(model=tiny_vit(num_labels=3), args=make_args(tmp_path), train_dataset=RandomImages())
    assert trainer.sp_regularizer.split.new == ["classifier.weight"]


def test_fisher_estimated_at_start(tmp_path):
    args = make_args(tmp_path, sp_penalty="l2_sp_fisher", sp_fisher_batches=1, sp_alpha=10.0)
    trainer = SPTrainer(model=tiny_vit(), args=args, train_dataset=RandomImages())
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    states = [optimizer.state[trainer.model.get_parameter(n)] for n in trainer.sp_regularizer.split.anchored]
    assert all("sp_fisher" in s and float(s["sp_fisher"].min()) >= 0 for s in states)
    assert any(float(s["sp_fisher"].max()) > 0 for s in states)


def test_sp_compile_estimates_the_fisher_with_the_compiled_pairs(tmp_path, monkeypatch):
    """sp_compile=True with sp_fisher_batches: estimate_fisher(compile=True), whose kernel gives the pairs."""
    from tests.test_compiled_pairs import spy_on_the_kernel

    ran = spy_on_the_kernel(monkeypatch)
    args = make_args(tmp_path, sp_penalty="l2_sp_fisher", sp_fisher_batches=1, sp_alpha=10.0, sp_compile=True)
    trainer = SPTrainer(model=tiny_vit(), args=args, train_dataset=RandomImages())
    trainer.train()
    # check_compiler's call, then the ViT's Linear layers over its tokens
    assert len(ran) > 1 and all(ran)
    optimizer = trainer.optimizer.optimizer
    states = [optimizer.state[trainer.model.get_parameter(n)] for n in trainer.sp_regularizer.split.anchored]
    assert all("sp_fisher" in s for s in states) and any(float(s["sp_fisher"].max()) > 0 for s in states)


def test_hyperparameter_search_anchors_each_trial_on_its_fresh_model(tmp_path):
    pytest.importorskip("optuna")
    seeds = itertools.count(10)
    made = []

    def model_init(trial=None):
        model = tiny_vit(seed=next(seeds))
        made.append(params(model))
        return model

    class AnchorCheck(TrainerCallback):
        def __init__(self):
            self.checked, self.alphas = 0, []

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step != 1:
                return
            raw = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
            name = "vit.embeddings.patch_embeddings.projection.weight"
            anchor = raw.state[model.get_parameter(name)][ANCHOR_KEY]
            assert torch.equal(anchor, made[-1][name])  # this trial's own pretrained weights
            assert trainer.sp_regularizer.alpha == args.sp_alpha  # the trial's alpha reached the regularizer
            self.alphas.append(args.sp_alpha)
            self.checked += 1

    check = AnchorCheck()
    trainer = SPTrainer(
        model_init=model_init,
        args=make_args(tmp_path),
        train_dataset=RandomImages(),
        eval_dataset=RandomImages(n=8),
        callbacks=[check],
    )
    best = trainer.hyperparameter_search(
        hp_space=lambda trial: {"sp_alpha": trial.suggest_float("sp_alpha", 0.01, 1.0, log=True)},
        backend="optuna",
        n_trials=2,
        direction="minimize",
    )
    assert check.checked == 2 and best is not None
    assert check.alphas[0] != check.alphas[1]


class _UnfreezeAtStart(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.requires_grad_(True)


def test_tensors_frozen_at_build_train_with_their_penalty_once_unfrozen(tmp_path):
    # gradual unfreezing: the body is frozen when the trainer (and its optimizer) is built, unfrozen before the
    # first step; the run must equal one that was never frozen (roles by structure, tensors in the optimizer)
    expected = reference_run(tiny_vit(), RandomImages(), penalty="l2_sp", alpha=0.3, beta=0.2, lr=0.05, steps=3)
    model = tiny_vit()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier"))
    args = make_args(tmp_path, sp_alpha=0.3, sp_beta=0.2)
    trainer = SPTrainer(model=model, args=args, train_dataset=RandomImages(), callbacks=[_UnfreezeAtStart()])
    trainer.train()
    got = params(trainer.model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    roles = {n: g["sp_role"] for g in trainer.optimizer.optimizer.param_groups for n in g["sp_names"]}
    assert all(roles[n] == "anchored" for n in trainer.sp_regularizer.split.anchored)


def test_raw_timm_model_with_architecture_arguments_is_refused_with_the_fix(tmp_path):
    # saved with empty model_args, it would be rebuilt with the default architecture on resume / from_pretrained
    raw = timm.create_model("vit_tiny_patch16_224", num_classes=3, **TINY_TIMM_VIT_ARGS)
    with pytest.raises(ValueError, match=r"first difference.*wrap_timm_model\(model, model_args="):
        SPTrainer(model=raw, args=make_args(tmp_path), train_dataset=RandomImages())
    with pytest.raises(ValueError, match=r"model_args=\{'img_size': 16\}"):  # incomplete arguments are caught too
        wrap_timm_model(raw, model_args={"img_size": 16})


def test_timm_model_args_rebuild_the_saved_model(tmp_path):
    trainer = SPTrainer(model=tiny_timm_vit(), args=make_args(tmp_path, max_steps=1), train_dataset=RandomImages())
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "saved")
    for name, value in params(trainer.model).items():
        torch.testing.assert_close(params(loaded)[name], value, msg=name)


@pytest.mark.parametrize("alpha,beta,stops", [(0.0, 0.0, False), (0.1, 0.0, True), (0.0, 0.1, True)])
def test_divergence_stops_only_when_the_penalty_is_active(tmp_path, alpha, beta, stops):
    # at zero strength the penalty changes nothing, so Trainer's rule holds: logging_nan_inf_filter and carry on
    class DivergeAll(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float("nan"))

    args = make_args(tmp_path, max_steps=4, sp_alpha=alpha, sp_beta=beta)
    trainer = SPTrainer(model=tiny_vit(), args=args, train_dataset=RandomImages(), callbacks=[DivergeAll()])
    if stops:
        with pytest.raises(FloatingPointError, match="non-finite"):
            trainer.train()
    else:
        trainer.train()
        assert trainer.state.global_step == 4


def test_load_best_model_at_end_loads_all_of_the_best_checkpoint(tmp_path):
    # HF ViT is saved under legacy key names, which Trainer's non-strict load would silently skip
    args = make_args(
        tmp_path,
        max_steps=3,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=False,  # the eval loss on these images is lowest before the last step
    )
    trainer = SPTrainer(model=tiny_vit(), args=args, train_dataset=RandomImages(), eval_dataset=RandomImages(n=8))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-3")
    expected = params(type(trainer.model).from_pretrained(best))
    last = params(type(trainer.model).from_pretrained(str(tmp_path / "out" / "checkpoint-3")))
    got = params(trainer.model)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(got[n], last[n]) for n in last)


def test_the_trainer_ends_each_engine_step_and_folds_on_time(tmp_path, monkeypatch):
    """SPTrainer ends the regularizer's step at each of its own (DeepSpeed ZeRO-3 steps the optimizer once per
    sub-group), so that the divergence check folds within FOLD_STEPS steps, not one later."""
    from hf_sp import regularizer

    ends, folds = [], []
    end_step, fold = regularizer.SPRegularizer.end_step, regularizer.SPRegularizer._fold
    monkeypatch.setattr(regularizer.SPRegularizer, "end_step", lambda self: (ends.append(1), end_step(self))[1])
    monkeypatch.setattr(regularizer.SPRegularizer, "_fold", lambda self: (folds.append(len(ends)), fold(self))[1])
    monkeypatch.setattr(regularizer, "FOLD_STEPS", 2)
    args = make_args(tmp_path, sp_penalty="l2_sp", sp_alpha=0.1, max_steps=3, logging_steps=10)
    SPTrainer(model=tiny_timm_vit(), args=args, train_dataset=RandomImages()).train()
    assert len(ends) == 3 and folds[0] == 2  # the second step's end folds its two records


PICKLE_TRAINER = """
import sys
import cloudpickle
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from conftest import RandomImages, make_args, tiny_vit
from hf_sp import SPTrainer
args = make_args(Path(sys.argv[2]), sp_penalty="l2_sp", max_steps=1)
trainer = SPTrainer(model_init=lambda: tiny_vit(), args=args, train_dataset=RandomImages())
trainer.model = None
assert type(cloudpickle.loads(cloudpickle.dumps(trainer))).__name__ == "SPTrainer"
"""


def test_the_trainer_pickles_whole(tmp_path):
    """Ray's hyperparameter search pickles the trainer (model_init, no model): nothing of SPTrainer's may stop it
    (a weak reference in its step-end callback did). A fresh process: what accelerate's shared state holds after
    other runs in this one is not SPTrainer's."""
    import os
    import subprocess
    import sys

    pytest.importorskip("cloudpickle")
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", PICKLE_TRAINER, tests, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
