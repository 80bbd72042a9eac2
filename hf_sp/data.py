"""Image classification data: Hub data sets, local imagefolder trees, and the built-in offline default.

Labels come from a ``ClassLabel`` feature; images are checked before training so that a corrupt
file fails (or is skipped and counted) up front, not hours into a run. :func:`select_examples`
keeps chosen classes and a fixed number of examples per class, chosen by a hash of each image's
file name, so that the same subset comes out of any copy of a data set that keeps its file names.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, concatenate_datasets, load_dataset
from datasets import Image as ImageFeature
from PIL import Image
from torchvision import transforms as T

logger = logging.getLogger(__name__)

#: scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes): the offline default data set.
DIGITS = "sklearn:digits"

_SPLIT_ALIASES = {"validation": ("validation", "val", "valid", "dev"), "test": ("test",)}

#: The splits that ``shots_per_class`` may name, in the order in which ``resplit`` deals them.
SPLITS = ("train", "validation", "test")


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
    classes: Sequence[str] | None = None,
    exclude_classes: Sequence[str] | None = None,
    shots_per_class: str | Mapping[str, int] | None = None,
    resplit: bool = False,
) -> DatasetDict:
    """A ``DatasetDict`` with ``train``, ``validation`` and possibly ``test``, columns ``image`` and ``label``.

    ``dataset_name`` is a Hub data set id (or :data:`DIGITS`); otherwise ``train_dir`` etc. are local
    imagefolder trees. ``classes``, ``exclude_classes``, ``shots_per_class`` and ``resplit`` select
    examples (:func:`select_examples`). Without a validation split, ``train_val_split`` of the training
    set is then held out.
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
    dataset = select_examples(
        dataset, classes=classes, exclude_classes=exclude_classes, shots=parse_shots(shots_per_class), resplit=resplit
    )
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


def parse_shots(value: str | int | Mapping[str, int] | None) -> dict[str, int] | None:
    """``"30"`` (train only), ``"train=40,validation=40,test=40"`` or a mapping -> ``{split: k}``.

    ``val`` is accepted for ``validation``. Raises ``ValueError`` (naming ``shots_per_class``) on anything else.
    """
    if value is None or value == "":
        return None
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, int) or str(value).strip().isdigit():
        items = [("train", value)]
    else:
        items = [item.partition("=")[::2] for item in str(value).split(",") if item.strip()]
    shots = {}
    for split, k in items:
        split = "validation" if str(split).strip() == "val" else str(split).strip()
        try:
            number = int(k)
        except (TypeError, ValueError):
            number = 0
        if split not in SPLITS or number <= 0 or str(number) != str(k).strip():
            raise ValueError(
                f"shots_per_class={value!r}: give positive counts per split, as SPLIT=K[,SPLIT=K] with SPLIT in "
                f"{list(SPLITS)} (e.g. train=40,validation=40,test=40), or one number for the train split."
            )
        shots[split] = number
    return shots


def example_keys(dataset: Dataset) -> list[str]:
    """The key that orders the examples of a class: ``sha1`` of the image's file name (without its folder).

    An image stored without a file name (some Hub data sets keep only the bytes) is keyed by the ``sha1``
    of its bytes instead. Either way the order depends on the images only, not on their row order.
    """
    if not isinstance(dataset.features.get("image"), ImageFeature):
        raise ValueError("Selecting examples by hash needs an 'image' column of type datasets.Image.")
    keys = []
    # arrow batches read the stored paths without decoding (or copying) the images; they respect select()
    for batch in dataset.select_columns(["image"]).with_format("arrow").iter(batch_size=1024):
        column = batch["image"]
        paths = pc.struct_field(column, "path").to_pylist()
        contents = pc.struct_field(column, "bytes")
        for i, path in enumerate(paths):
            if path:
                keys.append(hashlib.sha1(path.replace("\\", "/").rsplit("/", 1)[-1].encode()).hexdigest())
            elif contents[i].is_valid:
                keys.append("bytes:" + hashlib.sha1(contents[i].as_py()).hexdigest())
            else:
                raise ValueError(f"Image {i} has neither a file name nor bytes: it cannot be selected by hash.")
    return keys


def _select_classes(
    dataset: DatasetDict, classes: Sequence[str] | None, exclude_classes: Sequence[str] | None
) -> DatasetDict:
    names = dataset["train"].features["label"].names
    for arg, given in (("classes", classes), ("exclude_classes", exclude_classes)):
        unknown = [c for c in given or () if c not in names]
        if unknown:
            raise ValueError(
                f"{arg} {unknown[:5]} are not classes of the data set; it has {len(names)}: {names[:10]}"
                f"{' ...' if len(names) > 10 else ''}. Use its class names (as in its label feature)."
            )
    kept = sorted(set(classes or names) - set(exclude_classes or ()))
    if not kept:
        raise ValueError("classes / exclude_classes leave no class: keep at least two.")
    if kept == names:
        return dataset
    new_id = {names.index(name): i for i, name in enumerate(kept)}  # sorted names, as an imagefolder tree's
    label = ClassLabel(names=kept)
    dataset = dataset.filter(lambda labels: [y in new_id for y in labels], batched=True, input_columns="label")
    return dataset.map(
        lambda labels: {"label": [new_id[y] for y in labels]}, batched=True, input_columns="label"
    ).cast_column("label", label)


def _deal(part: Dataset, plan: Sequence[tuple[str, int]], where: str) -> dict[str, list[int]]:
    """Per class, rank the examples by :func:`example_keys` and hand out consecutive blocks of ``plan``'s sizes.

    A ``train`` or ``validation`` block must be full; a ``test`` block takes what remains, up to its size
    (small classes). Returns row indices per split, in the source's row order.
    """
    keys = example_keys(part)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(part["label"]):
        by_class.setdefault(label, []).append(index)
    names = part.features["label"].names
    chosen: dict[str, list[int]] = {split: [] for split, _ in plan}
    for label, indices in sorted(by_class.items()):
        ranked = sorted(indices, key=lambda i: (keys[i], i))
        start = 0
        for split, k in plan:
            block = ranked[start : start + k]
            if len(block) < k and split != "test":
                asked = ", ".join(f"{s}={n}" for s, n in plan)
                raise ValueError(
                    f"Class {names[label]!r} has {len(indices)} examples {where}, too few for shots_per_class "
                    f"{asked}: lower shots_per_class, or leave the class out with exclude_classes."
                )
            chosen[split] += block
            start += k
    return {split: sorted(indices) for split, indices in chosen.items()}


def select_examples(
    dataset: DatasetDict,
    *,
    classes: Sequence[str] | None = None,
    exclude_classes: Sequence[str] | None = None,
    shots: Mapping[str, int] | None = None,
    resplit: bool = False,
) -> DatasetDict:
    """Keep some classes, and a fixed ``k`` examples per class, chosen by hash (:func:`example_keys`).

    - ``classes`` / ``exclude_classes``: the classes kept; labels are renumbered in sorted name order.
    - ``shots`` (``{split: k}``): per class, the ``k`` examples of that split with the smallest keys
      (a ``test`` split takes up to ``k``; splits not named are kept whole).
    - ``resplit``: first pool every split, then deal ``train``, ``validation``, ``test`` (those named in
      ``shots``) from each class's ranking: ranks ``0..k_train-1`` train, the next ``k_validation``
      validation, then up to ``k_test`` test.

    Example (dtd10: the first 10 DTD classes, 40 / 40 / 40 per class)::

        select_examples(dtd, classes=["banded", ..., "crystalline"],
                        shots={"train": 40, "validation": 40, "test": 40}, resplit=True)
    """
    if resplit and not shots:
        raise ValueError("resplit needs shots_per_class, e.g. train=40,validation=40,test=40.")
    if classes or exclude_classes:
        dataset = _select_classes(dataset, classes, exclude_classes)
    if not shots:
        return dataset
    if resplit:
        pool = concatenate_datasets([dataset[split] for split in dataset])
        plan = [(split, shots[split]) for split in SPLITS if split in shots]
        dealt = _deal(pool, plan, f"in all splits together ({', '.join(dataset)})")
        selected = DatasetDict({split: pool.select(indices) for split, indices in dealt.items()})
    else:
        missing = [split for split in shots if split not in dataset]
        if missing:
            raise ValueError(
                f"shots_per_class names {missing}, which the data set lacks (splits: {list(dataset)}); "
                "pass resplit to deal every split anew from all the examples."
            )
        selected = DatasetDict(dataset)
        for split, k in shots.items():
            selected[split] = dataset[split].select(_deal(dataset[split], [(split, k)], f"in {split}")[split])
    logger.info("Selected by hash: %s", {split: len(part) for split, part in selected.items()})
    return selected


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


#: Area range of the training crops (timm's and torchvision's default ``scale``).
DEFAULT_CROP_SCALE = (0.08, 1.0)


def check_crop_scale(scale: Sequence[float]) -> tuple[float, float]:
    """``(lo, hi)`` with ``0 < lo <= hi <= 1``; ``ValueError`` naming ``train_crop_scale`` otherwise."""
    values = tuple(float(v) for v in scale)
    if len(values) != 2 or not 0 < values[0] <= values[1] <= 1:
        raise ValueError(
            f"train_crop_scale={list(scale)!r} must be two fractions of the image area, 0 < min <= max <= 1 "
            "(e.g. 0.08 1.0, the default, or 0.35 1.0 for milder crops)."
        )
    return values


def build_transforms(
    data_config: dict[str, Any], image_size: int | None = None, crop_scale: Sequence[float] = DEFAULT_CROP_SCALE
) -> tuple[Callable, Callable]:
    """Train (random resized crop of ``crop_scale`` of the area, flip) and eval (resize, centre crop) transforms
    from the model's config."""
    crop_scale = check_crop_scale(crop_scale)
    size = image_size or data_config["input_size"][-1]
    crop_pct = data_config.get("crop_pct") or 0.875
    interpolation = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}.get(
        data_config.get("interpolation", "bilinear"), T.InterpolationMode.BILINEAR
    )
    normalize = T.Normalize(mean=data_config["mean"], std=data_config["std"])
    train = T.Compose(
        [
            T.RandomResizedCrop(size, scale=crop_scale, interpolation=interpolation),
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
