"""The fine-tuning CLI: arguments, data, models, the end-to-end run, resume and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import shared_data
from PIL import Image

from hf_sp.data import DIGITS, check_images, load_image_dataset
from hf_sp.finetune import main, parse_args
from hf_sp.loading import PACKAGED_LITE0, load_model, load_packaged_lite0
from hf_sp.regularizer import ANCHOR_KEY
from hf_sp.trainer import SPTrainer

#: A quick run: the packaged EfficientNet-Lite0 on a slice of the digits, 32 px.
QUICK = [
    "--image_size",
    "32",
    "--max_train_samples",
    "64",
    "--max_eval_samples",
    "32",
    "--num_train_epochs",
    "1",
    "--per_device_train_batch_size",
    "16",
    "--logging_steps",
    "1",
    "--use_cpu",
    "--disable_tqdm",
    "true",
]


def make_tree(root: Path, classes: dict[str, list[str]], n: int = 3) -> None:
    """An imagefolder tree: root/<split>/<class>/<i>.png."""
    for split, names in classes.items():
        for k, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 12), color=(40 * k, 10 * i, 90)).save(folder / f"{i}.png")


# ------------------------------------------------------------------------------------------ arguments
def test_defaults_are_the_offline_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_args, data_args, args = parse_args([])
    assert model_args.model_name_or_path == PACKAGED_LITE0
    assert data_args.dataset_name == DIGITS
    assert args.sp_penalty == "l2_sp" and args.optim == "sgd" and args.eval_strategy == "epoch"
    assert args.output_dir == str(Path("outputs") / "packaged-tf_efficientnet_lite0-l2_sp")
    assert model_args.trust_remote_code is False


def test_yaml_config_and_command_line_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("sp_penalty: l1_sp\nsp_alpha: 0.5\nlearning_rate: 0.003\noutput_dir: " + str(tmp_path / "o"))
    _, _, args = parse_args(["--config", str(config), "--sp_alpha", "0.2"])
    assert (args.sp_penalty, args.sp_alpha, args.learning_rate) == ("l1_sp", 0.2, 0.003)
    assert args.output_dir == str(tmp_path / "o")


def test_yaml_config_with_an_unknown_key(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("sp_alpah: 0.5\n")
    with pytest.raises(ValueError, match=r"unknown arguments: \['sp_alpah'\]"):
        parse_args(["--config", str(config)])


def test_push_without_repo_id_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--push_to_hub needs --hub_model_id"):
        parse_args(["--output_dir", str(tmp_path), "--push_to_hub"])


def test_bad_input_exits_with_a_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"train_dir='.*nowhere' is not a directory"):
        main(["--train_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o")])


def test_a_finished_run_destroys_the_process_group_a_failed_one_leaves_it(tmp_path, monkeypatch):
    """A live gloo group at interpreter exit can abort a finished DDP run in its C++ teardown; after a failure the
    group is left alone (destroying NCCL while peers wait in a collective would hang them)."""
    import hf_sp.finetune as finetune

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(SystemExit, match="is not a directory"):
            main(["--train_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o")])
        assert torch.distributed.is_initialized()
        monkeypatch.setattr(finetune, "run", lambda *args: {"eval_accuracy": 1.0})
        main(["--output_dir", str(tmp_path / "o")])
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------ data
def test_local_imagefolder_and_validation_split(tmp_path):
    make_tree(tmp_path, {"train": ["a", "b"], "test": ["a", "b"]}, n=6)
    data = load_image_dataset(train_dir=str(tmp_path / "train"), test_dir=str(tmp_path / "test"), train_val_split=0.5)
    assert set(data) == {"train", "validation", "test"}
    assert data["train"].features["label"].names == ["a", "b"]
    assert len(data["train"]) == len(data["validation"]) == 6


def test_classes_that_differ_between_splits(tmp_path):
    make_tree(tmp_path, {"train": ["a", "b"], "val": ["a", "c"]})
    with pytest.raises(ValueError, match=r"classes of the validation split .* only in validation: \['c'\]"):
        load_image_dataset(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val"))


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    make_tree(tmp_path, {"train": ["a", "b"]})
    bad = tmp_path / "train" / "b" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    folder = str(tmp_path / "train")
    train = load_image_dataset(train_dir=folder, validation_dir=folder)["train"]
    assert len(train) == 7
    with pytest.raises(ValueError, match=r"Cannot read image .*broken.jpg.*--skip_corrupt_images"):
        check_images(train, split="train")
    kept, skipped = check_images(train, split="train", skip_corrupt=True)
    assert skipped == 1 and len(kept) == 6


def test_dataset_name_through_load_dataset(tmp_path):
    """--dataset_name goes through datasets.load_dataset (here a local folder; a Hub id takes the same path)."""
    make_tree(tmp_path / "ds", {"train": ["x", "y"], "validation": ["x", "y"], "test": ["x", "y"]})
    data = load_image_dataset(str(tmp_path / "ds"))
    assert {k: len(v) for k, v in data.items()} == {"train": 6, "validation": 6, "test": 6}
    assert data["test"].features["label"].names == ["x", "y"]


def test_missing_columns_are_named(tmp_path):
    make_tree(tmp_path / "ds", {"train": ["x", "y"]})
    with pytest.raises(ValueError, match=r"label_column_name='fine_label' is not a column.*\['image', 'label'\]"):
        load_image_dataset(str(tmp_path / "ds"), label_column="fine_label")


def test_digits_default():
    data = load_image_dataset(DIGITS)
    assert data["train"].features["label"].names == [str(i) for i in range(10)]
    assert len(data["train"]) + len(data["validation"]) + len(data["test"]) == 1797


def test_shared_dtd10_tree():
    root = shared_data("dtd10")
    data = load_image_dataset(
        train_dir=str(root / "train"), validation_dir=str(root / "val"), test_dir=str(root / "test")
    )
    assert len(data["train"]) == 400 and len(data["train"].features["label"].names) == 10


# ------------------------------------------------------------------------------------------ models
def test_packaged_lite0_has_the_imagenet_weights():
    model = load_packaged_lite0().eval()
    # ImageNet BatchNorm statistics are far from a fresh init's (0 mean, 1 var)
    assert float(model.bn1.running_var.mean()) != pytest.approx(1.0, abs=0.05)
    with torch.no_grad():
        probs = model(torch.zeros(1, 3, 224, 224)).softmax(-1)
    assert probs.shape == (1, 1000) and float(probs.max()) < 0.99


def test_unreachable_model_says_so_and_suggests_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"Could not load model_name_or_path='someone/vit-nowhere'.*local folder"):
        load_model("someone/vit-nowhere", num_labels=2, id2label={0: "a", 1: "b"})


def test_timm_architecture_with_local_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("test_resnet", num_classes=1000)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    loaded = load_model(
        "test_resnet",
        num_labels=4,
        id2label=dict(enumerate("abcd")),
        timm_weights_file=str(tmp_path / "w.safetensors"),
    )
    assert loaded.library == "timm" and loaded.model.num_labels == 4
    torch.testing.assert_close(loaded.model.timm_model.conv1[0].weight, source.conv1[0].weight)


def test_local_transformers_folder(tmp_path):
    from conftest import tiny_vit
    from transformers import ViTImageProcessor

    tiny_vit(num_labels=5).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "vit")
    loaded = load_model(str(tmp_path / "vit"), num_labels=3, id2label=dict(enumerate("abc")))
    assert loaded.library == "transformers" and loaded.model.config.num_labels == 3
    assert loaded.data_config["input_size"] == (3, 16, 16)


# ------------------------------------------------------------------------------------------ the run
@pytest.mark.slow
def test_end_to_end_run_writes_model_card_and_results(tmp_path):
    out = tmp_path / "run"
    main([*QUICK, "--output_dir", str(out)])
    for name in (
        "model.safetensors",
        "config.json",
        "README.md",
        "all_results.json",
        "eval_results.json",
        "test_results.json",
        "train_results.json",
    ):
        assert (out / name).is_file(), name
    results = json.loads((out / "all_results.json").read_text())
    assert 0 <= results["test_accuracy"] <= 1 and "eval_top5_accuracy" in results
    card = (out / "README.md").read_text()
    assert "l2_sp" in card and "alpha/2 * ||w_S - w0_S||^2" in card and "li2018explicit" in card
    # the saved config preprocesses at the resolution the model was trained and evaluated at
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 32, 32]
    # the saved model loads with timm alone, under timm's own key names
    import timm

    model = timm.create_model(
        "tf_efficientnet_lite0",
        num_classes=10,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(out / "model.safetensors"), "num_classes": 10},
    )
    assert model.classifier.out_features == 10


@pytest.mark.slow
def test_bf16_on_cpu(tmp_path):
    out = tmp_path / "run"
    main([*QUICK, "--output_dir", str(out), "--bf16", "--max_steps", "2", "--eval_strategy", "no"])
    state = json.loads((out / "trainer_state.json").read_text())
    assert all(h["sp_dist"] == h["sp_dist"] for h in state["log_history"] if "sp_dist" in h)  # not NaN
    assert state["log_history"][-2]["sp_dist"] > 0


@pytest.mark.slow
def test_resume_continues_with_the_original_anchor(tmp_path):
    out = tmp_path / "run"
    main(
        [
            *QUICK,
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            "--eval_strategy",
            "no",
        ]
    )
    assert (out / "checkpoint-2").is_dir()
    seen = {}
    train = SPTrainer.train

    def spy(self, *a, **k):
        result = train(self, *a, **k)
        seen["trainer"] = self
        return result

    try:
        SPTrainer.train = spy
        main(
            [
                *QUICK,
                "--output_dir",
                str(out),
                "--max_steps",
                "4",
                "--save_strategy",
                "steps",
                "--save_steps",
                "2",
                "--eval_strategy",
                "no",
            ]
        )
    finally:
        SPTrainer.train = train
    trainer = seen["trainer"]
    assert trainer.state.global_step == 4
    pretrained = load_packaged_lite0().state_dict()
    optimizer = trainer.optimizer.optimizer
    for name in trainer.sp_regularizer.split.anchored[:5]:
        anchor = optimizer.state[trainer.model.get_parameter(name)][ANCHOR_KEY]
        assert torch.equal(anchor, pretrained[name.removeprefix("timm_model.")]), name


@pytest.mark.parametrize("dropped", [("weight", "bias"), ("weight",)], ids=["whole_module", "one_tensor"])
def test_tensors_the_source_lacks_are_new_never_anchored_to_random(tmp_path, dropped):
    from conftest import tiny_vit
    from safetensors.torch import load_file, save_file
    from transformers import ViTImageProcessor

    from hf_sp.selection import check_new_not_anchored, new_modules, split_parameters

    tiny_vit(num_labels=5).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "vit")
    weights = tmp_path / "vit" / "model.safetensors"
    state = load_file(weights)
    for kind in dropped:  # saved under the legacy name of vit.layers.0.mlp.fc2
        del state[f"vit.encoder.layer.0.output.dense.{kind}"]
    save_file(state, weights, metadata={"format": "pt"})
    loaded = load_model(str(tmp_path / "vit"), num_labels=3, id2label=dict(enumerate("abc")))
    assert {"classifier.weight", "vit.layers.0.mlp.fc2.weight"} <= set(loaded.new_parameters)
    heads = new_modules(loaded.model, loaded.new_parameters)
    split = split_parameters(loaded.model, head_modules=heads or None)
    if len(dropped) == 2:  # a whole module is new: w_Sbar, as the source says
        assert heads == ["vit.layers.0.mlp.fc2", "classifier"]
        assert "vit.layers.0.mlp.fc2.weight" in split.new
        check_new_not_anchored(split, loaded.new_parameters, "vit")
    else:  # part of a module: refused, naming the tensor
        assert "vit.layers.0.mlp.fc2.weight" in split.anchored
        with pytest.raises(ValueError, match=r"vit.layers.0.mlp.fc2.weight.*sp_head_modules"):
            check_new_not_anchored(split, loaded.new_parameters, "vit")


@pytest.mark.parametrize("broken", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_resume_skips_a_checkpoint_cut_short(tmp_path, caplog, broken):
    from safetensors.torch import save_file

    from hf_sp.checkpoints import resume_checkpoint

    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        save_file({"w": torch.ones(64, 64)}, folder / "model.safetensors")
        torch.save({"state": {0: torch.ones(64)}}, folder / "optimizer.pt")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    newest = tmp_path / "checkpoint-4" / broken  # a kill while it was written
    newest.write_bytes(newest.read_bytes()[: len(newest.read_bytes()) // 2])
    with caplog.at_level("WARNING"):
        assert resume_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert "checkpoint-4" in caplog.text and broken in caplog.text
    with pytest.raises(ValueError, match=rf"checkpoint-4.*{broken}.*earlier checkpoint"):
        resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-4"))


def test_train_crop_scale_reaches_the_random_crops_and_bad_values_are_named(tmp_path):
    from hf_sp.data import build_transforms

    _, data_args, _ = parse_args(["--output_dir", str(tmp_path), "--train_crop_scale", "0.35", "1.0"])
    assert data_args.train_crop_scale == [0.35, 1.0]
    config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    train, _ = build_transforms(config, 32, data_args.train_crop_scale)
    (crop,) = [t for t in train.transforms if type(t).__name__ == "RandomResizedCrop"]
    assert crop.scale == (0.35, 1.0)
    default, _ = build_transforms(config, 32)
    assert [t.scale for t in default.transforms if hasattr(t, "scale")] == [(0.08, 1.0)]
    for bad in (["0.5", "0.2"], ["0", "1"], ["0.5", "1.5"]):
        with pytest.raises(ValueError, match="train_crop_scale"):
            parse_args(["--output_dir", str(tmp_path), "--train_crop_scale", *bad])
