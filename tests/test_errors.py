"""Bad input is refused at the boundary, with the argument's name and the fix."""

from __future__ import annotations

import pytest
import torch
from conftest import RandomImages, tiny_vit
from transformers import TrainingArguments

from hf_sp import SPConfig, SPTrainer, SPTrainingArguments, save_fisher, split_parameters


def cfg(tmp_path, **kwargs) -> SPConfig:
    return SPConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kwargs)


def test_alias():
    assert SPTrainingArguments is SPConfig
    assert issubclass(SPConfig, TrainingArguments)


def test_unknown_penalty_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"sp_penalty='l2sp' is not a known penalty. Known penalties: none, .*l2_sp"):
        cfg(tmp_path, sp_penalty="l2sp")


@pytest.mark.parametrize("field", ["sp_alpha", "sp_beta"])
@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf")])
def test_strengths_must_be_finite_and_non_negative(tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"{field} must be a finite number >= 0"):
        cfg(tmp_path, **{field: value})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sp_include": "weights"}, "sp_include='weights' is not one of"),
        ({"sp_mode": "adamw"}, "sp_mode='adamw' is not one of"),
        ({"sp_penalty": "l2_sp_fisher"}, "needs a Fisher diagonal: set sp_fisher_path"),
        ({"sp_fisher_path": "f.safetensors"}, "only used by sp_penalty='l2_sp_fisher'"),
        ({"sp_penalty": "l2_sp_fisher", "sp_fisher_batches": 0}, "sp_fisher_batches must be a positive integer"),
        ({"weight_decay": 0.05}, r"weight_decay=0.05 would decay the weights toward zero"),
    ],
)
def test_bad_combinations(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cfg(tmp_path, **kwargs)


def test_head_modules_from_a_comma_separated_string(tmp_path):
    assert cfg(tmp_path, sp_head_modules="head.fc, head_dist").sp_head_modules == ["head.fc", "head_dist"]


def test_plain_training_arguments_are_refused_with_the_fix(tmp_path):
    with pytest.raises(TypeError, match=r"Replace TrainingArguments\(...\) with SPConfig"):
        SPTrainer(model=tiny_vit(), args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))


def test_nothing_left_to_anchor(tmp_path):
    args = cfg(tmp_path, sp_head_modules=["vit", "classifier"])  # the whole model declared new
    with pytest.raises(ValueError, match=r"Nothing left to anchor"):
        SPTrainer(model=tiny_vit(), args=args, train_dataset=RandomImages())


def test_a_frozen_body_is_still_anchored(tmp_path):
    # frozen now, maybe unfrozen later (gradual unfreezing): its role comes from structure, not requires_grad
    model = tiny_vit()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier"))
    trainer = SPTrainer(model=model, args=cfg(tmp_path), train_dataset=RandomImages())
    assert "vit.layers.0.mlp.fc2.weight" in trainer.sp_regularizer.split.anchored


def test_no_head_found(tmp_path):
    model = tiny_vit()
    model.config.num_labels = 7  # no linear layer maps to 7 outputs
    with pytest.raises(ValueError, match=r"Could not find the new classification head.*sp_head_modules"):
        SPTrainer(model=model, args=cfg(tmp_path), train_dataset=RandomImages())


def test_fisher_file_for_another_model_names_the_first_bad_tensor(tmp_path):
    other = tiny_vit(num_labels=3)
    split = split_parameters(other)
    fisher = {n: torch.ones(s) for n, s in split.shapes.items() if n in split.anchored}
    first = split.anchored[0]
    fisher[first] = torch.ones(2, 2)
    save_fisher(fisher, tmp_path / "f.safetensors")
    args = cfg(tmp_path, sp_penalty="l2_sp_fisher", sp_fisher_path=str(tmp_path / "f.safetensors"))
    with pytest.raises(ValueError, match=rf"{first}"):
        SPTrainer(model=tiny_vit(), args=args, train_dataset=RandomImages())


def test_fisher_file_missing_an_anchored_tensor(tmp_path):
    model = tiny_vit()
    split = split_parameters(model)
    fisher = {n: torch.ones(s) for n, s in split.shapes.items() if n in split.anchored[1:]}
    save_fisher(fisher, tmp_path / "f.safetensors")
    args = cfg(tmp_path, sp_penalty="l2_sp_fisher", sp_fisher_path=str(tmp_path / "f.safetensors"))
    with pytest.raises(ValueError, match=split.anchored[0]):
        SPTrainer(model=model, args=args, train_dataset=RandomImages())
