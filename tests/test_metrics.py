"""hf_sp.metrics: the shipped evaluate metric modules against numpy / scikit-learn references, offline."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch
from conftest import RandomImages, tiny_vit
from sklearn.metrics import balanced_accuracy_score, recall_score, top_k_accuracy_score
from transformers import EvalPrediction, Trainer, TrainingArguments

import hf_sp.metrics
from hf_sp.metrics import METRIC_NAMES, build_compute_metrics, load_metric

# sklearn's balanced_accuracy_score warns about the predicted-but-absent classes that these tests use on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")

SEEDS = [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def top_k_metric() -> evaluate.EvaluationModule:
    return load_metric("top_k_accuracy", keep_in_memory=True)


@pytest.fixture(scope="module")
def balanced_metric() -> evaluate.EvaluationModule:
    return load_metric("mean_per_class_accuracy", keep_in_memory=True)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection (e.g. to the Hub) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def random_scores(seed: int, n: int = 200, num_classes: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Continuous random scores (no ties) and labels in which class 3 never occurs."""
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((n, num_classes)).astype(np.float32)
    labels = rng.choice(np.delete(np.arange(num_classes), 3), size=n)
    return scores, labels


def stable_argsort_top_k(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Reference for the tie rule: the k first classes of a stable sort by decreasing score."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


# ---------------------------------------------------------------------------------------------------------------
# top_k_accuracy


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 2, 5])
def test_top_k_matches_sklearn(top_k_metric, seed, k):
    scores, labels = random_scores(seed)
    result = top_k_metric.compute(predictions=scores, references=labels, k=k)
    key = "accuracy" if k == 1 else f"top{k}_accuracy"
    assert list(result) == [key]
    expected = top_k_accuracy_score(labels, scores, k=k, labels=np.arange(scores.shape[1]))
    assert result[key] == pytest.approx(expected, abs=1e-12)
    assert result[key] == pytest.approx(stable_argsort_top_k(scores, labels, k), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_top_k_list_of_k_and_python_lists(top_k_metric, seed):
    scores, labels = random_scores(seed, n=50, num_classes=10)
    result = top_k_metric.compute(predictions=scores.tolist(), references=labels.tolist(), k=[1, 3, 5])
    assert list(result) == ["accuracy", "top3_accuracy", "top5_accuracy"]
    for k, value in zip((1, 3, 5), result.values(), strict=True):
        assert value == pytest.approx(top_k_accuracy_score(labels, scores, k=k, labels=np.arange(10)), abs=1e-12)
    assert result["accuracy"] == pytest.approx(float((scores.argmax(1) == labels).mean()), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_ties_lower_index_first(top_k_metric, seed, k):
    rng = np.random.default_rng(100 + seed)
    scores = rng.integers(0, 3, size=(300, 6)).astype(np.float32)  # many ties
    labels = rng.integers(0, 6, size=300)
    result = top_k_metric.compute(predictions=scores, references=labels, k=k)
    expected = stable_argsort_top_k(scores, labels, k)
    assert next(iter(result.values())) == pytest.approx(expected, abs=1e-12)
    if k == 1:
        assert result["accuracy"] == pytest.approx(float((scores.argmax(1) == labels).mean()), abs=1e-12)


def test_top_k_all_equal_scores_are_not_all_correct(top_k_metric):
    labels = np.array([0, 1, 2, 2, 0, 1, 3, 0])
    scores = np.zeros((8, 4), dtype=np.float32)
    assert top_k_metric.compute(predictions=scores, references=labels)["accuracy"] == pytest.approx(3 / 8)
    # top-2 with all ties: classes 0 and 1 count.
    assert top_k_metric.compute(predictions=scores, references=labels, k=2)["top2_accuracy"] == pytest.approx(5 / 8)


def test_top_k_nan_scores_rank_last(top_k_metric):
    scores = np.array([[np.nan, 0.0, 1.0], [np.nan, 0.0, 1.0], [0.5, np.nan, 0.2]], dtype=np.float32)
    labels = np.array([0, 2, 0])
    result = top_k_metric.compute(predictions=scores, references=labels, k=[1, 2])
    assert result == {"accuracy": pytest.approx(2 / 3), "top2_accuracy": pytest.approx(2 / 3)}


def test_top_k_documented_examples(top_k_metric):
    preds = [[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]]
    assert top_k_metric.compute(predictions=preds, references=[2, 1], k=2) == {"top2_accuracy": 1.0}
    assert top_k_metric.compute(predictions=preds, references=[2, 1]) == {"accuracy": 0.0}
    assert top_k_metric.compute(predictions=preds, references=[2, 1], k=[1, 2]) == {
        "accuracy": 0.0,
        "top2_accuracy": 1.0,
    }
    # k >= number of classes: every label is within the top k.
    assert top_k_metric.compute(predictions=preds, references=[2, 1], k=5) == {"top5_accuracy": 1.0}


@pytest.mark.parametrize(
    ("predictions", "references", "k"),
    [
        ([[0.1, 0.9], [0.2, 0.8]], [0, 1], 0),
        ([[0.1, 0.9], [0.2, 0.8]], [0, 1], [1, -2]),
        ([[0.1, 0.9], [0.2, 0.8]], [0, 2], 1),
        ([[0.1, 0.9], [0.2, 0.8]], [0, -1], 1),
        ([[0.1, 0.9], [0.2, 0.8, 0.0]], [0, 1], 1),
    ],
)
def test_top_k_invalid_inputs(top_k_metric, predictions, references, k):
    with pytest.raises(ValueError):
        top_k_metric.compute(predictions=predictions, references=references, k=k)


# ---------------------------------------------------------------------------------------------------------------
# mean_per_class_accuracy


@pytest.mark.parametrize("seed", SEEDS)
def test_mean_per_class_matches_sklearn(balanced_metric, seed):
    rng = np.random.default_rng(seed)
    n, c = 300, 8
    # class 6 never predicted; class 2 predicted but never in the references; class 7 in neither.
    labels = rng.choice(np.array([0, 1, 3, 4, 5, 6]), size=n)
    preds = np.where(rng.random(n) < 0.5, labels, rng.choice(np.array([0, 1, 2, 3, 4, 5]), size=n))
    preds[preds == 6] = 0
    assert 6 in labels and 6 not in preds and 2 in preds and 2 not in labels

    result = balanced_metric.compute(predictions=preds, references=labels, num_classes=c, return_per_class=True)
    assert result["mean_per_class_accuracy"] == pytest.approx(balanced_accuracy_score(labels, preds), abs=1e-12)

    present = np.unique(labels)
    per_class = np.array(result["per_class_accuracy"])
    assert per_class.shape == (c,)
    expected = recall_score(labels, preds, labels=present, average=None, zero_division=0)
    np.testing.assert_allclose(per_class[present], expected, atol=1e-12)
    assert per_class[6] == 0.0
    assert np.isnan(per_class[[2, 7]]).all()

    # num_classes does not change the mean; without it the ids seen decide the length.
    plain = balanced_metric.compute(predictions=preds.tolist(), references=labels.tolist())
    assert plain == {"mean_per_class_accuracy": pytest.approx(result["mean_per_class_accuracy"], abs=1e-12)}


def test_mean_per_class_documented_example(balanced_metric):
    result = balanced_metric.compute(predictions=[0, 0, 0, 1], references=[0, 0, 0, 2])
    assert result == {"mean_per_class_accuracy": 0.5}
    # plain accuracy would be 0.75: the rare class weighs as much as the frequent one.


@pytest.mark.parametrize(
    ("predictions", "references", "kwargs"),
    [
        ([0, 1, 2], [0, 1, 1], {"num_classes": 2}),
        ([0, 1, 1], [0, 1, 3], {"num_classes": 3}),
        ([0, -1], [0, 1], {}),
        ([0, 1], [0, 1], {"num_classes": 0}),
    ],
)
def test_mean_per_class_invalid_inputs(balanced_metric, predictions, references, kwargs):
    with pytest.raises(ValueError):
        balanced_metric.compute(predictions=predictions, references=references, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# load_metric / build_compute_metrics


def test_unknown_metric_name_lists_known_names():
    with pytest.raises(ValueError, match="accuracy") as info:
        load_metric("accuracy")
    for name in METRIC_NAMES:
        assert name in str(info.value)
    assert set(METRIC_NAMES) == {"top_k_accuracy", "mean_per_class_accuracy"}


def test_load_metric_is_a_local_evaluate_module(no_network):
    for name in METRIC_NAMES:
        metric = load_metric(name)
        assert isinstance(metric, evaluate.Metric)
        assert metric.name == name
        assert (Path(hf_sp.metrics.__file__).parent / name / f"{name}.py").is_file()


@pytest.mark.parametrize("seed", SEEDS)
def test_build_compute_metrics_on_tuple_outputs(seed):
    rng = np.random.default_rng(seed)
    n, c = 120, 10
    logits = rng.standard_normal((n, c)).astype(np.float32)
    labels = rng.choice(np.array([0, 1, 2, 3, 4, 5, 6, 8, 9]), size=n)  # class 7 absent from the references
    hidden = rng.standard_normal((n, 4, 3)).astype(np.float32)
    compute_metrics = build_compute_metrics()

    result = compute_metrics(EvalPrediction(predictions=(logits, hidden), label_ids=labels))
    assert list(result) == ["accuracy", "top5_accuracy", "mean_per_class_accuracy"]
    assert all(isinstance(v, float) for v in result.values())
    assert result["accuracy"] == pytest.approx(float((logits.argmax(1) == labels).mean()), abs=1e-12)
    assert result["top5_accuracy"] == pytest.approx(
        top_k_accuracy_score(labels, logits, k=5, labels=np.arange(c)), abs=1e-12
    )
    assert result["mean_per_class_accuracy"] == pytest.approx(
        balanced_accuracy_score(labels, logits.argmax(1)), abs=1e-12
    )
    # A bare logits array gives the same.
    assert compute_metrics(EvalPrediction(predictions=logits, label_ids=labels)) == result


def test_build_compute_metrics_skips_k_at_least_num_classes():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((40, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=40)
    pred = EvalPrediction(predictions=(logits,), label_ids=labels)
    assert list(build_compute_metrics()(pred)) == ["accuracy", "mean_per_class_accuracy"]
    assert list(build_compute_metrics(top_k=(5, 4, 1, 4, 2))(pred)) == [
        "accuracy",
        "top2_accuracy",
        "top4_accuracy",
        "mean_per_class_accuracy",
    ]
    assert list(build_compute_metrics(top_k=())(pred)) == ["mean_per_class_accuracy"]
    one_class = EvalPrediction(predictions=np.zeros((3, 1), np.float32), label_ids=np.zeros(3, np.int64))
    assert build_compute_metrics()(one_class) == {"mean_per_class_accuracy": 1.0}


@pytest.mark.parametrize("top_k", [(0,), (1, -5), (1.0,), (True,)])
def test_build_compute_metrics_rejects_bad_k(top_k):
    with pytest.raises(ValueError, match="top_k"):
        build_compute_metrics(top_k=top_k)


def test_build_compute_metrics_loads_modules_once(monkeypatch):
    compute_metrics = build_compute_metrics(top_k=(1, 2))

    def no_load(*args, **kwargs):
        raise AssertionError("metric modules must be loaded once, when compute_metrics is built")

    monkeypatch.setattr(evaluate, "load", no_load)
    monkeypatch.setattr(hf_sp.metrics, "load_metric", no_load)
    rng = np.random.default_rng(1)
    for _ in range(3):
        logits = rng.standard_normal((30, 4)).astype(np.float32)
        labels = rng.integers(0, 4, size=30)
        result = compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
        assert result["accuracy"] == pytest.approx(float((logits.argmax(1) == labels).mean()), abs=1e-12)


def test_offline_env_vars(monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    compute_metrics = build_compute_metrics()
    logits = np.eye(6, dtype=np.float32)
    labels = np.array([0, 1, 2, 3, 4, 0])
    assert compute_metrics(EvalPrediction(predictions=(logits,), label_ids=labels)) == {
        "accuracy": pytest.approx(5 / 6),
        "top5_accuracy": 1.0,
        "mean_per_class_accuracy": pytest.approx((0.5 + 4) / 5),
    }


def test_fresh_process_without_offline_env_vars_never_reaches_the_network(tmp_path):
    """No HF_*_OFFLINE variables, an empty HF cache, and sockets that refuse: loading a local path must not try the Hub."""
    script = textwrap.dedent(
        """
        import json, socket, sys

        def refuse(*args, **kwargs):
            raise AssertionError(f"network access attempted: {args}")

        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse

        from hf_sp.metrics import load_metric

        top_k = load_metric("top_k_accuracy")
        balanced = load_metric("mean_per_class_accuracy")
        result = top_k.compute(predictions=[[0.2, 0.8, 0.0], [0.9, 0.1, 0.0]], references=[1, 1], k=[1, 2])
        result.update(balanced.compute(predictions=[1, 0], references=[1, 1]))
        json.dump(result, sys.stdout)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "accuracy": 0.5,
        "top2_accuracy": 1.0,
        "mean_per_class_accuracy": 0.5,
    }
    assert (tmp_path / "hf_home" / "modules" / "evaluate_modules" / "metrics" / "top_k_accuracy").is_dir()


def test_trainer_evaluate_reports_the_metrics(tmp_path, no_network):
    data = RandomImages(n=24, seed=3)
    model = tiny_vit(seed=1)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        per_device_eval_batch_size=8,
    )
    trainer = Trainer(model=model, args=args, eval_dataset=data, compute_metrics=build_compute_metrics(top_k=(1, 2)))
    metrics = trainer.evaluate()

    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=data.x).logits.numpy()
    labels = data.y.numpy()
    assert metrics["eval_accuracy"] == pytest.approx(float((logits.argmax(1) == labels).mean()), abs=1e-6)
    assert metrics["eval_top2_accuracy"] == pytest.approx(
        top_k_accuracy_score(labels, logits, k=2, labels=np.arange(3)), abs=1e-6
    )
    assert metrics["eval_mean_per_class_accuracy"] == pytest.approx(
        balanced_accuracy_score(labels, logits.argmax(1)), abs=1e-6
    )
    assert "eval_top5_accuracy" not in metrics  # 3 classes: top-5 is skipped
