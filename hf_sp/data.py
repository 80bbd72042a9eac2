"""Image classification data: Hub data sets, local imagefolder trees, and the built-in offline default.

Labels come from a ``ClassLabel`` feature; images are checked before training so that a corrupt
file fails (or is skipped and counted) up front, not hours into a run.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, load_dataset
from datasets import Image as ImageFeature
from PIL import Image
from torchvision import transforms as T

logger = logging.getLogger(__name__)

#: scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes): the offline default data set.
DIGITS = "sklearn:digits"

_SPLIT_ALIASES = {"validation": ("validation", "val", "valid", "dev"), "test": ("test",)}


def digits_dataset(seed: int = 0) -> DatasetDict:
    """scikit-learn's handwritten digits as RGB PIL images, split 60/20/20 per class (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0 * 255).astype(np.uint8)
    index = np.arange(len(images))
    train, rest = train_test_split(index, test_size=0.4, stratify=digits.target, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=digits.target[rest], random_state=seed)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=[str(i) for i in range(10)])})

    def split(ids: np.ndarray) -> Dataset:
        return Dataset.from_dict(
            {"image": [Image.fromarray(images[i]).convert("RGB") for i in ids], "label": digits.target[ids].tolist()},
            features=features,
        )

    return DatasetDict(train=split(train), validation=split(val), test=split(test))


def _classes_of(folder: str) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.is_dir())


def _local_dataset(train_dir: str | None, validation_dir: str | None, test_dir: str | None) -> DatasetDict:
    dirs = {"train": train_dir, "validation": validation_dir, "test": test_dir}
    dirs = {split: d for split, d in dirs.items() if d is not None}
    for split, folder in dirs.items():
        arg = f"{split}_dir"
        if not Path(folder).is_dir():
            raise ValueError(f"{arg}={folder!r} is not a directory. Give a folder with one sub-folder per class.")
        if not _classes_of(folder):
            raise ValueError(
                f"{arg}={folder!r} has no class sub-folders (imagefolder layout: {folder}/<class>/img.jpg)."
            )
    reference_split, reference = next(iter(dirs.items()))
    names = _classes_of(reference)
    for split, folder in dirs.items():
        classes = _classes_of(folder)
        if classes != names:
            only_here = sorted(set(classes) - set(names))
            missing = sorted(set(names) - set(classes))
            raise ValueError(
                f"The classes of the {split} split ({folder}) differ from the {reference_split} split ({reference}): "
                f"only in {split}: {only_here[:5]}, missing from {split}: {missing[:5]}. Every split needs the same "
                "class sub-folders."
            )
    data_files = {split: str(Path(folder) / "**") for split, folder in dirs.items()}
    dataset = load_dataset("imagefolder", data_files=data_files)
    return dataset.cast_column("label", ClassLabel(names=names))


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    *,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    test_dir: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    train_val_split: float | None = 0.15,
    seed: int = 0,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | None = None,
) -> DatasetDict:
    """A ``DatasetDict`` with ``train``, ``validation`` and possibly ``test``, columns ``image`` and ``label``.

    ``dataset_name`` is a Hub data set id (or :data:`DIGITS`); otherwise ``train_dir`` etc. are local
    imagefolder trees. Without a validation split, ``train_val_split`` of the training set is held out.
    """
    if dataset_name == DIGITS:
        dataset = digits_dataset(seed)
    elif dataset_name is not None:
        try:
            dataset = load_dataset(
                dataset_name, dataset_config_name, revision=revision, token=token, cache_dir=cache_dir
            )
        except (OSError, ConnectionError, ValueError) as err:
            raise ValueError(
                f"Could not load dataset_name={dataset_name!r}: {str(err).splitlines()[0][:300]}. Offline, use "
                "local imagefolder trees with --train_dir / --validation_dir / --test_dir."
            ) from err
    elif train_dir is not None:
        dataset = _local_dataset(train_dir, validation_dir, test_dir)
    else:
        raise ValueError("Give --dataset_name (a Hub data set) or --train_dir (a local imagefolder tree).")

    dataset = _rename_splits(dataset)
    if "train" not in dataset:
        raise ValueError(f"The data set has no train split (splits: {list(dataset)}).")
    columns = dataset["train"].column_names
    for arg, column in (("image_column_name", image_column), ("label_column_name", label_column)):
        if column not in columns:
            raise ValueError(f"{arg}={column!r} is not a column of the data set; columns: {columns}.")
    if image_column != "image":
        dataset = dataset.rename_column(image_column, "image")
    if label_column != "label":
        dataset = dataset.rename_column(label_column, "label")
    dataset = _ensure_class_label(dataset)
    if "validation" not in dataset:
        if not train_val_split:
            raise ValueError("The data set has no validation split: give --validation_dir or --train_val_split > 0.")
        parts = dataset["train"].train_test_split(test_size=train_val_split, seed=seed, stratify_by_column="label")
        dataset["train"], dataset["validation"] = parts["train"], parts["test"]
    return dataset


def _rename_splits(dataset: DatasetDict) -> DatasetDict:
    for canonical, aliases in _SPLIT_ALIASES.items():
        if canonical not in dataset:
            for alias in aliases:
                if alias in dataset:
                    dataset[canonical] = dataset.pop(alias)
                    break
    return dataset


def _ensure_class_label(dataset: DatasetDict) -> DatasetDict:
    feature = dataset["train"].features["label"]
    if isinstance(feature, ClassLabel):
        for split, part in dataset.items():
            if part.features["label"].names != feature.names:
                raise ValueError(
                    f"The classes of the {split} split differ from the train split: "
                    f"{part.features['label'].names[:5]}... vs {feature.names[:5]}..."
                )
        return dataset
    names = sorted({str(v) for v in dataset["train"]["label"]})
    for split, part in dataset.items():
        unknown = sorted({str(v) for v in part["label"]} - set(names))
        if unknown:
            raise ValueError(f"The {split} split has labels that the train split lacks: {unknown[:5]}.")
    label = ClassLabel(names=names)
    return dataset.map(lambda row: {"label": label.str2int(str(row["label"]))}).cast_column("label", label)


def check_images(dataset: Dataset, *, split: str, skip_corrupt: bool = False) -> tuple[Dataset, int]:
    """Decode every image once; a corrupt or non-image file raises, naming it, or is dropped and counted.

    Returns the (possibly filtered) data set and the number of skipped files.
    """
    raw = dataset.cast_column("image", ImageFeature(decode=False))
    bad: list[int] = []
    for i, item in enumerate(raw["image"]):
        source = item.get("path") or f"{split}[{i}]"
        try:
            with Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]) as image:
                image.load()
        except Exception as err:  # PIL raises many types for broken files
            if not skip_corrupt:
                raise ValueError(
                    f"Cannot read image {source} ({type(err).__name__}: {err}). Remove or fix the file, or pass "
                    "--skip_corrupt_images to skip such files (they are counted and reported)."
                ) from err
            logger.warning("Skipping unreadable image %s (%s)", source, err)
            bad.append(i)
    if bad:
        dataset = dataset.select(sorted(set(range(len(dataset))) - set(bad)))
    return dataset, len(bad)


def build_transforms(data_config: dict[str, Any], image_size: int | None = None) -> tuple[Callable, Callable]:
    """Train (random resized crop, flip) and eval (resize, centre crop) transforms from the model's config."""
    size = image_size or data_config["input_size"][-1]
    crop_pct = data_config.get("crop_pct") or 0.875
    interpolation = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}.get(
        data_config.get("interpolation", "bilinear"), T.InterpolationMode.BILINEAR
    )
    normalize = T.Normalize(mean=data_config["mean"], std=data_config["std"])
    train = T.Compose(
        [
            T.RandomResizedCrop(size, interpolation=interpolation),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            normalize,
        ]
    )
    evaluate = T.Compose(
        [
            # as timm: resize to floor(size / crop_pct), centre crop; crop_pct 1.0 resizes straight to size x size
            T.Resize(math.floor(size / crop_pct) if crop_pct < 1.0 else (size, size), interpolation=interpolation),
            T.CenterCrop(size),
            T.ToTensor(),
            normalize,
        ]
    )
    return train, evaluate


def attach_transform(dataset: Dataset, transform: Callable) -> Dataset:
    """Images become ``pixel_values`` tensors on access (``set_transform``), labels become ``labels``."""

    def apply(batch: dict[str, list]) -> dict[str, list]:
        return {
            "pixel_values": [transform(image.convert("RGB")) for image in batch["image"]],
            "labels": batch["label"],
        }

    dataset.set_transform(apply)
    return dataset


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack ``pixel_values`` and ``labels`` into a batch."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor([e["labels"] for e in examples]),
    }
