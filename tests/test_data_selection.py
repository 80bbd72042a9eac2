"""Classes and fixed k-shot subsets chosen by hash: against a hand-written ranking, on local trees and Hub-style data."""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

import pytest
from conftest import shared_data
from datasets import ClassLabel, Dataset, DatasetDict, Features, concatenate_datasets
from datasets import Image as ImageFeature
from PIL import Image

from hf_sp.data import example_keys, load_image_dataset, parse_shots, select_examples
from hf_sp.finetune import parse_args as finetune_parse_args


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), color=color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pool(root: Path, sizes: dict[str, int]) -> Path:
    """root/<class>/<class>_<i>.png: one folder per class, no splits (as DTD's images/ and Caltech's release)."""
    for k, (name, n) in enumerate(sizes.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{name}_{i:04d}.png").write_bytes(png((40 * k, 7 * i, 100)))
    return root


def by_sha1(names: list[str]) -> list[str]:
    """The reference ranking, written out: file names ordered by the hex sha1 of the name."""
    return sorted(names, key=lambda name: hashlib.sha1(name.encode()).hexdigest())


def file_names(part: Dataset) -> list[str]:
    return [Path(item["path"]).name for item in part.cast_column("image", ImageFeature(decode=False))["image"]]


def test_shots_parse_and_bad_values_name_the_argument():
    assert parse_shots("30") == {"train": 30} and parse_shots(None) is None
    assert parse_shots("train=40,val=5,test=20") == {"train": 40, "validation": 5, "test": 20}
    assert parse_shots({"train": 2, "validation": 1}) == {"train": 2, "validation": 1}
    for bad in ("train=0", "dev=3", "train=2.5", "train=x", "train"):
        with pytest.raises(ValueError, match="shots_per_class"):
            parse_shots(bad)
    with pytest.raises(ValueError, match="shots_per_class"):
        finetune_parse_args(["--shots_per_class", "train=-1"])
    with pytest.raises(ValueError, match="--resplit needs --shots_per_class"):
        finetune_parse_args(["--resplit"])


def test_resplit_deals_consecutive_ranks_of_the_file_name_hash(tmp_path):
    pool = write_pool(tmp_path / "pool", {"b": 9, "a": 7, "c": 3})
    data = load_image_dataset(
        train_dir=str(pool), exclude_classes=["c"], shots_per_class="train=3,validation=2,test=4", resplit=True
    )
    assert data["train"].features["label"].names == ["a", "b"]  # sorted names, "c" left out, renumbered
    for label, name, n in ((0, "a", 7), (1, "b", 9)):
        ranked = by_sha1([f"{name}_{i:04d}.png" for i in range(n)])
        got = {
            split: sorted(f for f, y in zip(file_names(part), part["label"], strict=True) if y == label)
            for split, part in data.items()
        }
        assert got["train"] == sorted(ranked[:3]) and got["validation"] == sorted(ranked[3:5])
        assert got["test"] == sorted(ranked[5:9])  # "a" has only 2 left for test: a test split takes what remains
    assert [len(data[s]) for s in ("train", "validation", "test")] == [6, 4, 6]
    # the examples keep the source's order (here: sorted paths, as an imagefolder tree loads)
    assert file_names(data["train"]) == sorted(file_names(data["train"]))


def test_selection_depends_on_the_images_not_on_the_row_order(tmp_path):
    pool = write_pool(tmp_path / "pool", {"a": 6, "b": 6})
    source = load_image_dataset(train_dir=str(pool), train_val_split=0.5)
    merged = DatasetDict(train=concatenate_datasets([source["train"], source["validation"]]))
    shuffled = DatasetDict(train=merged["train"].shuffle(seed=3))
    a = select_examples(merged, shots={"train": 2})["train"]
    b = select_examples(shuffled, shots={"train": 2})["train"]
    assert sorted(file_names(a)) == sorted(file_names(b))
    assert len(a) == 4


def test_too_few_examples_unknown_classes_and_missing_splits_are_refused(tmp_path):
    pool = write_pool(tmp_path / "pool", {"a": 4, "b": 6})
    with pytest.raises(ValueError, match=r"Class 'a' has 4 examples .*lower shots_per_class.*exclude_classes"):
        load_image_dataset(train_dir=str(pool), shots_per_class="train=3,validation=2,test=1", resplit=True)
    with pytest.raises(ValueError, match=r"classes \['z'\] are not classes of the data set; it has 2: \['a', 'b'\]"):
        load_image_dataset(train_dir=str(pool), classes=["a", "z"])
    with pytest.raises(ValueError, match=r"shots_per_class names \['test'\].*resplit"):
        load_image_dataset(train_dir=str(pool), shots_per_class="test=1")
    with pytest.raises(ValueError, match="leave no class"):
        load_image_dataset(train_dir=str(pool), exclude_classes=["a", "b"])


def hub_style_folder(root: Path, *, with_names: bool, image: str = "image", label: str = "label") -> Path:
    """A data set laid out as on the Hub (parquet shards under data/, images embedded), loadable by its folder name."""
    features = Features({image: ImageFeature(), label: ClassLabel(names=["cat", "dog", "owl"])})
    (root / "data").mkdir(parents=True)
    for split, offset in (("train", 0), ("test", 100)):
        rows = {image: [], label: []}
        for y in range(3):
            for i in range(5):
                name = f"{['cat', 'dog', 'owl'][y]}_{offset + i}.png" if with_names else None
                rows[image].append({"bytes": png((80 * y, 11 * i + offset, 30)), "path": name})
                rows[label].append(y)
        Dataset.from_dict(rows, features=features).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def test_hub_style_data_set_keyed_by_file_name_or_by_bytes(tmp_path):
    named = hub_style_folder(tmp_path / "named", with_names=True, image="img", label="fine")
    data = load_image_dataset(
        str(named),
        image_column="img",
        label_column="fine",
        classes=["cat", "owl"],
        shots_per_class={"train": 4, "validation": 3, "test": 3},
        resplit=True,
    )
    assert data["train"].features["label"].names == ["cat", "owl"]
    owls = [f"owl_{i}.png" for i in (0, 1, 2, 3, 4, 100, 101, 102, 103, 104)]
    got = [f for f, y in zip(file_names(data["train"]), data["train"]["label"], strict=True) if y == 1]
    assert sorted(got) == sorted(by_sha1(owls)[:4])

    anonymous = hub_style_folder(tmp_path / "anonymous", with_names=False, image="img", label="fine")
    raw = load_image_dataset(str(anonymous), image_column="img", label_column="fine", train_val_split=0.2)
    stored = [item["bytes"] for item in raw["test"].cast_column("image", ImageFeature(decode=False))["image"]]
    assert example_keys(raw["test"]) == ["bytes:" + hashlib.sha1(b).hexdigest() for b in stored]


@pytest.mark.parametrize(
    "name, shots", [("dtd10", "train=40,validation=40,test=40"), ("caltech101", "train=20,validation=5,test=20")]
)
def test_rebuilding_the_shared_data_sets_gives_their_manifests(name, shots):
    root = shared_data(name)
    data = load_image_dataset(
        train_dir=str(root / "train"),
        validation_dir=str(root / "val"),
        test_dir=str(root / "test"),
        shots_per_class=shots,
        resplit=True,
    )
    with open(root / "manifest.csv", newline="") as f:
        expected = {row["path"].split("/", 1)[1]: row["split"] for row in csv.DictReader(f)}
    got = {}
    for split, part in data.items():
        for path in part.cast_column("image", ImageFeature(decode=False))["image"]:
            got["/".join(Path(path["path"]).parts[-2:])] = {"validation": "val"}.get(split, split)
    assert got == expected
