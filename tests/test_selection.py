"""New-head detection and the anchored / new / free split, on real architectures built small."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import transformers as tf
from conftest import RandomImages, tiny_vit

from hf_sp import estimate_fisher, find_head_modules, split_parameters, wrap_timm_model

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
        ["classifier"],
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
    assert sorted(roles) == sorted(n for n, _ in model.named_parameters())


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


def _clip_like(kind: str, num_labels: int):
    small = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=16)
    text = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    if kind == "clip":
        config = tf.CLIPConfig(
            vision_config={**small, "patch_size": 8}, text_config=text, projection_dim=16, num_labels=num_labels
        )
        return tf.CLIPForImageClassification(config)
    config = tf.SiglipConfig(vision_config={**small, "patch_size": 8}, text_config=text, num_labels=num_labels)
    return tf.SiglipForImageClassification(config)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_clip_style_head_when_num_labels_equals_the_hidden_size(kind):
    # their base_model_prefix ('clip', 'siglip') names no module: attention and MLP layers of the hidden size
    # (16 outputs, like the 16-way head) must not pass for the head
    model = _clip_like(kind, num_labels=16)
    assert find_head_modules(model) == ["classifier"]
    split = split_parameters(model)
    assert split.new == ["classifier.weight"]
    assert "vision_model.encoder.layers.0.self_attn.q_proj.weight" in split.anchored


def test_replaced_mlp_head_is_new_as_a_whole():
    model = tiny_vit()
    model.classifier = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    assert find_head_modules(model) == ["classifier"]
    split = split_parameters(model)
    # the hidden layer is new too: anchoring it to its random initialisation would be wrong
    assert split.new == ["classifier.0.weight", "classifier.2.weight"]
    assert not any(n.startswith("classifier") for n in split.anchored)
    assert "found by structure" in split.summary()


def test_tied_tensor_listed_once():
    model = tiny_vit()
    attention = model.vit.layers[0].attention
    attention.k_proj.weight = attention.q_proj.weight  # one tensor under two names
    split = split_parameters(model)
    assert "vit.layers.0.attention.q_proj.weight" in split.anchored
    assert "vit.layers.0.attention.k_proj.weight" not in split.anchored + split.new + split.free
    assert len(split.anchored) == len(set(split.anchored))
    unique = {id(p): p for p in model.parameters()}
    total = sum(math.prod(split.shapes[n]) for n in split.anchored + split.new + split.free)
    assert total == sum(p.numel() for p in unique.values())
    # the Fisher over the anchored names (sp_fisher_batches) works on it
    data = RandomImages(n=4)
    loader = [{"pixel_values": data.x, "labels": data.y}]
    fisher = estimate_fisher(model, loader, param_names=split.anchored)
    assert sorted(fisher) == sorted(split.anchored)


def test_roles_follow_structure_not_requires_grad():
    model = tiny_vit()
    unfrozen = split_parameters(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier"))
    frozen = split_parameters(model)
    assert frozen.anchored == unfrozen.anchored and frozen.new == unfrozen.new and frozen.free == unfrozen.free
    assert set(frozen.frozen) == {n for n, p in model.named_parameters() if not p.requires_grad}
    assert f"{len(frozen.anchored)} frozen now" in frozen.summary()
