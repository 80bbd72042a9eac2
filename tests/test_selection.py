"""New-head detection and the anchored / new / free split, on real architectures built small."""

from __future__ import annotations

import pytest
import timm
import torch
import transformers as tf
from conftest import tiny_vit

from hf_sp import find_head_modules, split_parameters, wrap_timm_model

CASES = {
    "vit": (tiny_vit, ["classifier"]),
    "convnext": (
        lambda: tf.ConvNextForImageClassification(
            tf.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)
        ),
        ["classifier"],
    ),
    "resnet": (
        lambda: tf.ResNetForImageClassification(
            tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)
        ),
        ["classifier.1"],
    ),
    "swin": (
        lambda: tf.SwinForImageClassification(
            tf.SwinConfig(
                image_size=32, patch_size=4, embed_dim=8, depths=[1], num_heads=[2], window_size=4, num_labels=5
            )
        ),
        ["classifier"],
    ),
    "dinov2": (
        lambda: tf.Dinov2ForImageClassification(tf.Dinov2Config(**SMALL_VIT, num_labels=5)),
        ["classifier"],
    ),
    "deit_distilled": (
        lambda: tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**SMALL_VIT, num_labels=5)),
        ["cls_classifier", "distillation_classifier"],
    ),
    "timm_resnet": (lambda: timm.create_model("test_resnet", num_classes=5), ["fc"]),
    "timm_vit": (
        lambda: timm.create_model(
            "vit_tiny_patch16_224", num_classes=5, img_size=32, embed_dim=16, depth=1, num_heads=2
        ),
        ["head"],
    ),
    "timm_convnext": (lambda: timm.create_model("test_convnext", num_classes=5), ["head.fc"]),
    # as many classes as the source (1000): nothing is mismatched, the classifier is still found
    "timm_same_classes": (lambda: timm.create_model("test_efficientnet"), ["classifier"]),
}
SMALL_VIT = dict(
    hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, image_size=32, patch_size=8
)


@pytest.mark.parametrize("case", CASES)
def test_head_found_by_architecture(case):
    make, heads = CASES[case]
    model = make()
    assert find_head_modules(model) == heads
    split = split_parameters(model)
    assert split.new and all(any(n.startswith(h + ".") for h in heads) for n in split.new)
    assert all(n.endswith(".weight") for n in split.anchored + split.new)  # kernels only by default
    # no overlap, nothing lost
    roles = split.anchored + split.new + split.free
    assert sorted(roles) == sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_timm_wrapper_head_is_prefixed():
    model = wrap_timm_model(timm.create_model("test_resnet", num_classes=5))
    assert find_head_modules(model) == ["timm_model.fc"]


def test_hf_head_found_when_class_count_equals_a_source_head():
    model = tiny_vit(num_labels=1000)
    assert find_head_modules(model) == ["classifier"]


def test_kernels_only_by_default_and_everything_with_include_all():
    model = timm.create_model("test_resnet", num_classes=5)
    kernels = split_parameters(model)
    everything = split_parameters(model, include="all")
    assert "bn1.weight" in kernels.free and "conv1.0.weight" in kernels.anchored
    assert "bn1.weight" in everything.anchored and "fc.bias" in everything.new and not everything.free


def test_explicit_head_override():
    model = timm.create_model("test_resnet", num_classes=5)
    split = split_parameters(model, head_modules=["layer4", "fc"])
    assert "fc.weight" in split.new and any(n.startswith("layer4.") for n in split.new)
    assert not any(n.startswith("layer4.") for n in split.anchored)


def test_unknown_head_module_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"sp_head_modules names 'clasifier'"):
        split_parameters(tiny_vit(), head_modules=["clasifier"])


def test_no_head_found_is_an_error_with_the_fix():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    with pytest.raises(ValueError, match=r"Could not find the new classification head.*sp_head_modules"):
        split_parameters(model)


def test_wrapper_prefixes_are_ignored():
    split = split_parameters(tiny_vit())
    assert split.role("module.classifier.weight") == "new"
    assert split.role("_fsdp_wrapped_module.vit.layers.0._fsdp_wrapped_module.mlp.fc1.weight") == "anchored"
    assert split.role("_orig_mod.vit.layers.0.mlp.fc1.bias") == "free"
