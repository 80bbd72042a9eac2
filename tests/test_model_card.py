"""Model card rendering: metadata, text, token filtering, round trips. Offline and fast."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

import hf_sp
from hf_sp import SPConfig
from hf_sp.model_card import (
    SPCardInfo,
    hyperparameters_from_args,
    model_card_template_path,
    render_model_card,
    sanitize_hyperparameters,
)

FAKE_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz012345"


def make_info(**overrides) -> SPCardInfo:
    info = SPCardInfo(
        model_id="me/vit-beans-l2sp",
        base_model="google/vit-base-patch16-224",
        library="transformers",
        dataset_name="beans",
        penalty="l2_sp",
        penalty_formula=hf_sp.get_penalty_info("l2_sp").formula,
        alpha=0.1,
        beta=0.01,
        mode="gradient",
        include="kernels",
        anchored="48 tensors, 85,054,464 parameters (conv and linear kernels)",
        new="classifier: 1 tensor, 2,304 parameters",
        final_distance=1.2345,
        relative_distance=0.0123,
        eval_results={
            "eval_accuracy": 0.9125,
            "eval_top5_accuracy": 1.0,
            "eval_loss": 0.31,
            "eval_runtime": 1.5,
            "test_accuracy": 0.875,
            "epoch": 3.0,
        },
        hyperparameters={
            "learning_rate": 0.01,
            "per_device_train_batch_size": 64,
            "num_train_epochs": 30,
            "optimizer": "sgd",
            "lr_scheduler_type": "linear",
            "seed": 42,
            "mixed_precision": "bf16",
        },
        num_labels=3,
        label_names=["angular_leaf_spot", "bean_rust", "healthy"],
    )
    return dataclasses.replace(info, **overrides)


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    yaml_block = text.split("---\n", 2)[1]
    return yaml.safe_load(yaml_block)


def model_index_values(data: dict) -> dict[tuple[str | None, str], float]:
    values = {}
    for entry in data["model-index"]:
        for result in entry["results"]:
            assert result["task"]["type"] == "image-classification"
            split = result["dataset"].get("split")
            for metric in result["metrics"]:
                values[(split, metric["type"])] = metric["value"]
    return values


def test_template_found():
    path = model_card_template_path()
    assert path.name == "hf_sp_model_card.md"
    assert path.read_text(encoding="utf-8").startswith("---\n{{ card_data }}\n---")


def test_transformers_card_metadata_roundtrip():
    card = render_model_card(make_info())
    parsed = ModelCard(str(card))
    data = parsed.data.to_dict()

    assert data["base_model"] == "google/vit-base-patch16-224"
    assert data["datasets"] == ["beans"]
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-classification"
    for tag in ("hf_sp", "image-classification", "starting-point-regularization", "l2_sp"):
        assert tag in data["tags"]
    assert "license" not in data

    assert data["model-index"][0]["name"] == "me/vit-beans-l2sp"
    values = model_index_values(data)
    assert values == {
        ("validation", "accuracy"): 0.9125,
        ("validation", "top5_accuracy"): 1.0,
        ("test", "accuracy"): 0.875,
    }
    assert parsed.data.model_name == "me/vit-beans-l2sp"
    assert {(r.dataset_type, r.metric_type, r.metric_value) for r in parsed.data.eval_results} >= {
        ("beans", "accuracy", 0.9125)
    }

    # The YAML front matter is plain YAML (card.validate() needs the network).
    assert front_matter(str(card)) == data


def test_transformers_card_text():
    text = str(render_model_card(make_info()))
    assert "alpha/2 * ||w_S - w0_S||^2 + beta/2 * ||w_Sbar||^2" in text
    assert "pretrained weights w0" in text
    assert "| alpha (`sp_alpha`) | 0.1 |" in text
    assert "| beta (`sp_beta`) | 0.01 |" in text
    assert "`gradient`" in text and "`kernels`" in text
    assert "85,054,464 parameters" in text and "classifier: 1 tensor" in text
    assert "1.2345" in text and "1.23%" in text
    assert "| Accuracy (validation) | 0.9125 |" in text
    assert "| Loss (validation) | 0.31 |" in text
    assert "| learning_rate | 0.01 |" in text and "| seed | 42 |" in text and "| mixed_precision | bf16 |" in text
    assert 'AutoModelForImageClassification.from_pretrained("me/vit-beans-l2sp")' in text
    assert 'pipeline("image-classification", model="me/vit-beans-l2sp")' in text
    assert "timm.create_model" not in text
    assert "not needed at inference" in text
    assert "@inproceedings{li2018explicit," in text and "ICML" in text and "1802.01483" in text
    assert f"- hf_sp {hf_sp.__version__}" in text
    assert "- transformers " in text and "- torch " in text
    assert "`healthy`" in text


def test_timm_card():
    info = make_info(
        model_id="me/effnet-lite0-dogs",
        base_model="timm/tf_efficientnet_lite0.in1k",
        library="timm",
        dataset_name="user/stanford-dogs",
        penalty="l2_sp_fisher",
        penalty_formula=hf_sp.get_penalty_info("l2_sp_fisher").formula,
        alpha=0.05,
        beta=0.001,
        mode="decoupled",
        include="all",
        new="classifier: 2 tensors, 153,720 parameters",
        eval_results={"eval_accuracy": 0.8, "test_top5_accuracy": 0.95},
        license="apache-2.0",
        tags=["dogs"],
    )
    card = render_model_card(info)
    text = str(card)
    data = ModelCard(text).data.to_dict()
    assert data["base_model"] == "timm/tf_efficientnet_lite0.in1k"
    assert data["datasets"] == ["user/stanford-dogs"]
    assert data["library_name"] == "timm"
    assert data["license"] == "apache-2.0"
    assert {"hf_sp", "image-classification", "starting-point-regularization", "l2_sp_fisher", "dogs"} <= set(
        data["tags"]
    )
    assert model_index_values(data) == {("validation", "accuracy"): 0.8, ("test", "top5_accuracy"): 0.95}
    assert data["model-index"][0]["results"][0]["dataset"]["type"] == "user/stanford-dogs"
    assert hf_sp.get_penalty_info("l2_sp_fisher").formula in text
    assert "| alpha (`sp_alpha`) | 0.05 |" in text and "| beta (`sp_beta`) | 0.001 |" in text
    assert "`decoupled`" in text
    assert 'timm.create_model("hf-hub:me/effnet-lite0-dogs", pretrained=True)' in text
    assert 'AutoModelForImageClassification.from_pretrained("me/effnet-lite0-dogs")' in text
    assert "@inproceedings{li2018explicit," in text


def test_hf_hub_prefix_of_base_model_is_dropped():
    data = render_model_card(make_info(base_model="hf-hub:timm/resnet18.a1_in1k")).data.to_dict()
    assert data["base_model"] == "timm/resnet18.a1_in1k"


def test_local_paths_stay_out_of_metadata(tmp_path: Path):
    local_model = tmp_path / "checkpoints" / "my-vit"
    local_model.mkdir(parents=True)
    for base_model in ("/home/someone/checkpoints/my-vit", "./checkpoints/my-vit", str(local_model)):
        info = make_info(model_id=str(tmp_path / "out-run"), base_model=base_model, dataset_name="/data/dogs")
        card = render_model_card(info)
        data = ModelCard(str(card)).data.to_dict()
        assert "base_model" not in data
        assert "datasets" not in data
        text = str(card)
        assert "a local checkpoint (`my-vit`)" in text
        assert "someone" not in text and str(tmp_path) not in text
        # The model is named after the output directory; the data set by its folder name.
        assert data["model-index"][0]["name"] == "out-run"
        assert data["model-index"][0]["results"][0]["dataset"]["type"] == "dogs"

    # A relative name that exists on disk is a local checkpoint too, as for from_pretrained.
    info = make_info(base_model="my-vit")
    cwd = os.getcwd()
    os.chdir(local_model.parent)
    try:
        data = render_model_card(info).data.to_dict()
    finally:
        os.chdir(cwd)
    assert "base_model" not in data


def test_no_model_index_without_model_id_or_dataset():
    for overrides in ({"model_id": None}, {"dataset_name": None}):
        card = render_model_card(make_info(**overrides))
        data = ModelCard(str(card)).data.to_dict()
        assert "model-index" not in data
        # The results are still in the text.
        assert "| Accuracy (validation) | 0.9125 |" in str(card)


def test_plain_finetuning_and_l2_baseline():
    text = str(render_model_card(make_info(penalty="none", penalty_formula="", final_distance=None)))
    assert "no regularization penalty" in text
    assert "Omega(w) =" not in text
    assert "not recorded" in text
    data = ModelCard(text).data.to_dict()
    assert "none" not in data["tags"]

    l2 = hf_sp.get_penalty_info("l2").formula
    text = str(render_model_card(make_info(penalty="l2", penalty_formula=l2)))
    assert l2 in text and "toward **zero**" in text


def test_tokens_never_reach_the_card():
    hyperparameters = {
        "learning_rate": 0.01,
        "hub_token": FAKE_TOKEN,
        "push_to_hub_token": FAKE_TOKEN,
        "HUB_TOKEN": "anything",
        "my_secret": "s3cr3t-value",
        "db_password": "pa55word-value",
        "wandb_api_key": "0123456789abcdef",
        "run_note": FAKE_TOKEN,
        "short_hf": "hf_x",
        "report_to": ["tensorboard", FAKE_TOKEN],
        "optim_args": {"momentum": 0.9, "token": "nested-token-value", "url": f"https://u:{FAKE_TOKEN}@example.org"},
        "seed": 7,
    }
    cleaned = sanitize_hyperparameters(hyperparameters)
    assert cleaned == {
        "learning_rate": 0.01,
        "report_to": ["tensorboard"],
        "optim_args": {"momentum": 0.9},
        "seed": 7,
    }
    assert "hub_token" in hyperparameters  # the input is not modified

    text = str(render_model_card(make_info(hyperparameters=hyperparameters)))
    for secret in (
        FAKE_TOKEN,
        "hf_x",
        "anything",
        "s3cr3t-value",
        "pa55word-value",
        "0123456789abcdef",
        "nested-token",
    ):
        assert secret not in text
    assert "token" not in text.lower().split("## training hyperparameters")[1].split("##")[0]
    assert "| learning_rate | 0.01 |" in text and "| seed | 7 |" in text


def test_hyperparameters_from_args(tmp_path: Path):
    args = SPConfig(
        output_dir=str(tmp_path),
        learning_rate=0.02,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        num_train_epochs=5,
        seed=3,
        hub_token=FAKE_TOKEN,
        report_to="none",
    )
    hp = hyperparameters_from_args(args)
    assert hp["learning_rate"] == 0.02
    assert hp["per_device_train_batch_size"] == 8
    assert hp["total_train_batch_size"] == 16
    assert hp["num_train_epochs"] == 5
    assert hp["seed"] == 3
    assert hp["mixed_precision"] == "no"
    assert isinstance(hp["optimizer"], str) and isinstance(hp["lr_scheduler_type"], str)
    assert FAKE_TOKEN not in str(hp)


def test_save_roundtrip(tmp_path: Path):
    card = render_model_card(make_info())
    path = tmp_path / "README.md"
    card.save(path)
    loaded = ModelCard.load(path)
    assert loaded.data.to_dict() == card.data.to_dict()
    assert loaded.text == card.text
    assert front_matter(path.read_text(encoding="utf-8"))["base_model"] == "google/vit-base-patch16-224"


@pytest.mark.parametrize("metric_value", [0.5, 1])
def test_numpy_like_metric_values(metric_value):
    class Scalar:
        def __init__(self, v):
            self.v = v

        def item(self):
            return self.v

    card = render_model_card(make_info(eval_results={"eval_accuracy": Scalar(metric_value)}))
    data = front_matter(str(card))
    assert model_index_values(data) == {("validation", "accuracy"): metric_value}


def test_trainer_card_arguments_reach_the_card_beside_the_sp_facts(tmp_path: Path):
    # Trainer.push_to_hub(**kwargs) passes these to create_model_card; none may vanish
    from conftest import RandomImages, make_args, tiny_vit

    from hf_sp import SPTrainer

    def accuracy(p):
        return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}

    trainer = SPTrainer(
        model=tiny_vit(),
        args=make_args(tmp_path, max_steps=1),
        train_dataset=RandomImages(),
        compute_metrics=accuracy,
    )
    trainer.train()
    trainer.evaluate(RandomImages(n=8))
    trainer.create_model_card(
        language="en",
        license="mit",
        tags=["my-tag"],
        model_name="my-model",
        finetuned_from="google/vit-base-patch16-224",
        tasks="image-classification",
        dataset_tags="beans",
        dataset="Beans",
        dataset_args="default",
    )
    card = ModelCard.load(tmp_path / "out" / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "mit" and data["language"] == ["en"]
    assert data["base_model"] == "google/vit-base-patch16-224" and data["datasets"] == ["beans"]
    assert {"my-tag", "l2_sp", "hf_sp"} <= set(data["tags"])
    assert card.text.lstrip().startswith("<!--") and "# my-model" in card.text
    assert {r.dataset_args for r in card.data.eval_results} == {"default"}
    assert "alpha/2 * ||w_S - w0_S||^2" in card.text  # the SP facts stay
