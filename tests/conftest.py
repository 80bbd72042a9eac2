"""Small hand-built models and data sets: no downloads, a few seconds each."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch.utils.data import Dataset
from transformers import ViTConfig, ViTForImageClassification

from hf_sp import SPConfig, wrap_timm_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def extensions_dir() -> str:
    """A folder of torch extensions built on the fly (DeepSpeed's CPU ops) for this torch version alone, beside
    torch's default ``pyXY_cuZZZ`` folder, which every torch version with that tag shares. Sharing it loads an op
    built against other torch headers, and from torch 2.14 on the build lock is an OS lock on a ``lock`` file that
    stays there: an earlier torch, whose lock is that file's existence, then waits for it forever (torch 2.11:
    DeepSpeed's ranks hang before the first step)."""
    from torch.utils.cpp_extension import get_default_build_root

    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return os.path.join(get_default_build_root(), f"{python}_torch{torch.__version__}")


os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())

#: Real image data sets (dtd10, caltech101) beside the repository, or where HF_SP_TEST_DATA points: optional.
SHARED_DATA = Path(os.environ.get("HF_SP_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_data(name: str) -> Path:
    """The folder of a real data set, or skip the test saying what is missing."""
    folder = SHARED_DATA / name
    if not (folder / "train").is_dir():
        pytest.skip(f"real data set {name!r} not present: {folder} (set HF_SP_TEST_DATA to the folder holding it)")
    return folder


NUM_CLASSES = 3
IMAGE_SIZE = 16


class RandomImages(Dataset):
    """Fixed random images with labels that depend on them (so that training learns something)."""

    def __init__(
        self,
        n: int = 16,
        seed: int = 0,
        size: int = IMAGE_SIZE,
        num_classes: int = NUM_CLASSES,
        dtype: torch.dtype = torch.float32,
    ):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g, dtype=dtype)
        self.y = (self.x.mean(dim=(1, 2, 3)) * 50).long().remainder(num_classes)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def tiny_vit(seed: int = 0, num_labels: int = NUM_CLASSES) -> ViTForImageClassification:
    """A transformers ViT (takes loss kwargs), no dropout, so that runs are comparable."""
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        image_size=IMAGE_SIZE,
        patch_size=8,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


#: The timm.create_model arguments of the tiny timm ViT: recorded in its config, so that it can be rebuilt.
TINY_TIMM_VIT_ARGS = dict(img_size=IMAGE_SIZE, patch_size=8, embed_dim=16, depth=1, num_heads=2)


def tiny_timm_vit(seed: int = 0, num_classes: int = NUM_CLASSES) -> torch.nn.Module:
    """A timm ViT in TimmWrapperForImageClassification, with its architecture arguments (no BatchNorm, no loss
    kwargs)."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **TINY_TIMM_VIT_ARGS)
    return wrap_timm_model(model, model_args=TINY_TIMM_VIT_ARGS)


def tiny_timm_cnn(seed: int = 0, num_classes: int = NUM_CLASSES) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", pretrained=False, num_classes=num_classes)


#: Every transfer method at once (with L2-SP): the composition tests' recipe.
ALL_METHODS = dict(
    sp_head_init="probe",
    sp_batchnorm="frozen",
    sp_body_lr_scale=0.5,
    sp_layer_decay=0.5,
    sp_interpolation_grid=[0.0, 0.5, 1.0],
    sp_penalty="l2_sp",
    sp_alpha=0.5,
    sp_spd=1.0,
    sp_projection="ftp",
    sp_delta=0.1,
)


def make_args(tmp_path, **kwargs) -> SPConfig:
    """Deterministic full-batch SGD without clipping: runs that a hand-written loop can reproduce exactly."""
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        learning_rate=0.05,
        per_device_train_batch_size=16,
        max_steps=3,
        seed=0,
    )
    defaults.update(kwargs)
    return SPConfig(**defaults)


@pytest.fixture
def data() -> RandomImages:
    return RandomImages()


@pytest.fixture
def fresh_compiler():
    """Compiler caches emptied (so that no earlier test's graphs count toward the recompile limit); returns a check
    that the compiled step ran compiled code rather than falling back to Python."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()

    def compiled_frames() -> int:
        return counters["stats"]["unique_graphs"]

    yield compiled_frames
    torch._dynamo.reset()
