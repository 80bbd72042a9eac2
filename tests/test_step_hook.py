"""The step hook under the Trainer setups that touch gradients or weights around the optimizer step.

fp16 loss scaling is reproduced on CPU with ``torch.amp.GradScaler("cpu")`` on the accelerator: the gradients reach
the optimizer scaled, exactly as on a GPU, and fused optimizers get the scale to divide by in their own kernel.
"""

from __future__ import annotations

import pytest
import torch
from conftest import RandomImages, make_args, tiny_timm_cnn, tiny_vit
from transformers import Trainer, TrainerCallback, TrainingArguments, get_linear_schedule_with_warmup

from hf_sp import SPConfig, SPTrainer
from hf_sp.models import is_timm_model, wrap_timm_model
from hf_sp.regularizer import ANCHOR_KEY

#: The tensor the callbacks below act on: an anchored kernel of tiny_vit.
ANCHORED = "vit.layers.0.mlp.fc2.weight"


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def use_grad_scaler(trainer: SPTrainer, *, unscaled_before_step: bool) -> torch.amp.GradScaler:
    """Give the trainer's accelerator a CPU GradScaler, as ``fp16=True`` does on a GPU.

    ``unscaled_before_step``: accelerate unscales the gradients when Trainer computes their norm (transformers 5.24
    always does; 5.0 only with ``max_grad_norm > 0``); otherwise they reach ``optimizer.step()`` still scaled.
    """
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    accelerator = trainer.accelerator
    accelerator.scaler = scaler
    if unscaled_before_step:

        def unscale_gradients(optimizer=None):
            scaler.unscale_(getattr(trainer.optimizer, "optimizer", trainer.optimizer))

        accelerator.unscale_gradients = unscale_gradients
    return scaler


#: Adam and a strong penalty: a penalty gradient lost or rescaled shows in every weight.
SETTINGS = dict(sp_alpha=5.0, sp_beta=0.5, max_steps=4, optim="adamw_torch")


def train(tmp_path, *, scaler: str | None = None, callbacks=(), resume: str | None = None, **kwargs) -> SPTrainer:
    args = make_args(tmp_path, **{**SETTINGS, **kwargs})
    trainer = SPTrainer(model=tiny_vit(), args=args, train_dataset=RandomImages(), callbacks=list(callbacks))
    if scaler is not None:
        use_grad_scaler(trainer, unscaled_before_step=scaler == "unscaled_before_step")
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
@pytest.mark.parametrize(
    "scaler, max_grad_norm",
    [("scaled_at_step", 0.0), ("unscaled_before_step", 0.0), ("unscaled_before_step", 1.0)],
)
def test_fp16_loss_scaling_leaves_the_run_bit_identical(tmp_path, optim, scaler, max_grad_norm):
    """A fused optimizer divides the still-scaled gradients by the loss scale in its kernel: the penalty's too."""
    common = dict(optim=optim, max_grad_norm=max_grad_norm)
    expected = params(train(tmp_path / "plain", **common).model)
    got = params(train(tmp_path / "scaled", scaler=scaler, **common).model)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


class OverflowAt(TrainerCallback):
    """Makes one gradient infinite at one step (an fp16 overflow) and records the weights after every step."""

    def __init__(self, step: int):
        self.step, self.weights, self.handle = step, [], None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def hook(grad):
            return grad * float("inf") if state.global_step == self.step else grad

        self.handle = model.get_parameter(ANCHORED).register_hook(hook)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append(params(model))

    def on_train_end(self, args, state, control, **kwargs):
        self.handle.remove()


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
@pytest.mark.parametrize("mode", ["gradient", "decoupled"])
def test_a_step_the_scaler_skips_moves_no_weight(tmp_path, optim, mode):
    overflow = OverflowAt(step=2)
    trainer = train(tmp_path, scaler="scaled_at_step", callbacks=[overflow], optim=optim, sp_mode=mode)
    before, skipped, after = overflow.weights[1:4]
    for name, value in before.items():
        assert torch.equal(skipped[name], value), name
    assert any(not torch.equal(after[n], skipped[n]) for n in skipped)  # the next step trains again
    assert "sp_dist" not in trainer.state.log_history[2]  # nor is it counted in the penalty's averages


class FreezeFirstStep(TrainerCallback):
    """Gradual unfreezing: ``ANCHORED`` gets no gradient at the first optimizer step, one from the second on."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        model.get_parameter(ANCHORED).requires_grad_(state.global_step > 0)


def test_a_tensor_without_gradient_at_the_first_step_is_anchored_on_its_pretrained_weights(tmp_path):
    start = params(tiny_vit())
    trainer = train(tmp_path, callbacks=[FreezeFirstStep()], save_strategy="steps", save_steps=2)
    optimizer = trainer.optimizer.optimizer
    p = trainer.model.get_parameter(ANCHORED)
    assert torch.equal(optimizer.state[p][ANCHOR_KEY], start[ANCHORED])
    assert not torch.equal(p.detach(), start[ANCHORED])  # it trained from step 2 on
    assert trainer.sp_regularizer.missing_anchors(optimizer) == []
    # its checkpoints resume
    again = train(tmp_path, max_steps=5, resume=str(tmp_path / "out" / "checkpoint-2"))
    anchor = again.optimizer.optimizer.state[again.model.get_parameter(ANCHORED)][ANCHOR_KEY]
    assert torch.equal(anchor, start[ANCHORED])


class GroupLearningRates(TrainerCallback):
    """The learning rate of every parameter group, by the group's first parameter name, after each step."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.steps.append({g["sp_names"][0]: g["lr"] for g in optimizer.optimizer.param_groups})


def test_a_user_scheduler_drives_every_split_group(tmp_path):
    """optimizers=(optimizer, scheduler): each group split by role follows the schedule of the group it came from."""
    model = tiny_vit()
    body = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    head = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    optimizer = torch.optim.SGD([{"params": body, "lr": 0.01}, {"params": head, "lr": 0.1}], lr=0.05)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=6)
    lrs = GroupLearningRates()
    args = make_args(tmp_path, max_steps=6, sp_alpha=0.5)
    trainer = SPTrainer(
        model=model, args=args, train_dataset=RandomImages(), optimizers=(optimizer, scheduler), callbacks=[lrs]
    )
    trainer.train()
    roles = {g["sp_role"] for g in optimizer.param_groups}
    assert len(optimizer.param_groups) == 4 and roles == {"anchored", "new", "free"}
    assert len(lrs.steps) == 6
    for step, by_group in enumerate(lrs.steps, start=1):
        factor = step / 2 if step < 2 else (6 - step) / 4
        for name, lr in by_group.items():
            assert lr == pytest.approx((0.1 if name.startswith("classifier.") else 0.01) * factor), (step, name)


class StepEvery:
    """A scheduler of one's own, not a torch one: its per-group state is unknown."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self):
        pass

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]


def test_a_scheduler_that_cannot_follow_the_split_is_refused_at_construction(tmp_path):
    model = tiny_vit()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match=r"optimizers=\(optimizer, scheduler\).*optimizers=\(optimizer, None\)"):
        SPTrainer(model=model, args=make_args(tmp_path), optimizers=(optimizer, StepEvery(optimizer)))


def test_a_user_optimizers_own_weight_decay_is_refused_at_construction(tmp_path):
    model = tiny_vit()
    decaying = torch.optim.AdamW(model.parameters(), lr=0.01)  # weight_decay=0.01 by default
    with pytest.raises(ValueError, match=r"weight_decay=0.01.*'vit\..*weight_decay=0.0"):
        SPTrainer(model=model, args=make_args(tmp_path), optimizers=(decaying, None))
    # without decay, or with decay on the free tensors only (biases, norms), it trains
    free = [p for n, p in model.named_parameters() if not n.endswith(".weight") or "layernorm" in n]
    rest = [p for n, p in model.named_parameters() if all(p is not q for q in free)]
    optimizer = torch.optim.AdamW([{"params": rest, "weight_decay": 0.0}, {"params": free}], lr=0.01)
    args = make_args(tmp_path, max_steps=1)
    SPTrainer(model=model, args=args, train_dataset=RandomImages(), optimizers=(optimizer, None)).train()
    # plain fine-tuning keeps the optimizer as it is
    SPTrainer(model=tiny_vit(), args=make_args(tmp_path, sp_penalty="none"), optimizers=(decaying, None))


def plain_model(make_model):
    model = make_model()
    return wrap_timm_model(model) if is_timm_model(model) else model


#: Keys of Trainer's logs that measure time: they differ between any two runs.
TIMING = ("train_runtime", "train_samples_per_second", "train_steps_per_second")


@pytest.mark.parametrize(
    "make_model, mode",
    [(tiny_vit, "gradient"), (tiny_vit, "decoupled"), (tiny_timm_cnn, "gradient")],
    ids=["hf_vit", "hf_vit_decoupled", "timm_resnet_bn"],
)
def test_an_active_penalty_at_zero_strength_is_plain_trainer_bit_for_bit(tmp_path, make_model, mode):
    """AdamW, clipping, warmup: weights and logs equal Trainer's, apart from the sp_* entries."""
    common = dict(
        optim="adamw_torch",  # named: with a penalty, SPConfig's own default is the paper's SGD
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        max_steps=4,
        seed=0,
        per_device_train_batch_size=4,
        learning_rate=0.01,
        warmup_steps=2,
        max_grad_norm=0.5,
    )
    plain = Trainer(
        model=plain_model(make_model),
        args=TrainingArguments(output_dir=str(tmp_path / "plain"), **common),
        train_dataset=RandomImages(),
    )
    plain.train()
    args = SPConfig(output_dir=str(tmp_path / "sp"), sp_alpha=0.0, sp_beta=0.0, sp_mode=mode, **common)
    sp = SPTrainer(model=make_model(), args=args, train_dataset=RandomImages())
    sp.train()
    expected, got = params(plain.model), params(sp.model)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    start = params(plain_model(make_model))
    assert any(not torch.equal(got[name], start[name]) for name in start)  # and it trained

    def drop(entry):
        return {k: v for k, v in entry.items() if not k.startswith("sp_") and k not in TIMING}

    assert [drop(e) for e in sp.state.log_history] == [drop(e) for e in plain.state.log_history]
    assert all("sp_dist" in e for e in sp.state.log_history if "loss" in e)


def test_gradient_checkpointing_leaves_the_run_bit_identical(tmp_path):
    expected = params(train(tmp_path / "plain").model)
    got = params(train(tmp_path / "checkpointed", gradient_checkpointing=True).model)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


class OutOfMemoryOnce(TrainerCallback):
    """The first attempt runs out of memory after two optimizer steps (as a larger batch can, late in a step)."""

    def __init__(self):
        self.raised = False

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2 and not self.raised:
            self.raised = True
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_auto_find_batch_size_restart_keeps_the_pretrained_anchor(tmp_path):
    """Trainer restarts with a smaller batch on the weights trained so far; the anchor stays the pretrained one."""
    start = params(tiny_vit())
    oom = OutOfMemoryOnce()
    trainer = train(tmp_path, callbacks=[oom], auto_find_batch_size=True, per_device_train_batch_size=8)
    assert oom.raised and trainer._train_batch_size < 8  # it did restart
    optimizer = trainer.optimizer.optimizer
    for name in trainer.sp_regularizer.split.anchored:
        assert torch.equal(optimizer.state[trainer.model.get_parameter(name)][ANCHOR_KEY], start[name]), name
