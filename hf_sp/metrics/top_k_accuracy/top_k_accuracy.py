"""Top-k accuracy for single-label classification, as an offline `evaluate` metric module.

Shipped inside ``hf_sp`` and loaded from its local path (``hf_sp.metrics.load_metric("top_k_accuracy")`` or
``evaluate.load("<path>/top_k_accuracy")``), so that no Hub access is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-k accuracy: the fraction of samples whose true label is among the k classes with the highest scores.

    top_k_accuracy = (1 / N) * sum_i 1[ rank_i(y_i) < k ]

where rank_i(c) is the 0-based position of class c when the scores s_i of sample i are sorted in decreasing order,
ties broken by the lower class index first:

    rank_i(c) = #{j : s_ij > s_ic} + #{j < c : s_ij == s_ic}

This is the order of ``np.argsort(-s_i, kind="stable")``; for k = 1 it is ``np.argmax`` (and ``torch.argmax``),
so that top-1 accuracy is the usual argmax accuracy. A sample whose true class ties with others is therefore not
counted as correct merely because of the tie (all-equal scores give top-1 accuracy = fraction of label 0, not 1).
NaN scores are treated as -inf. Note that scikit-learn's ``top_k_accuracy_score`` breaks ties the other way
(higher class index first); the two agree whenever there are no ties.

If k >= the number of classes C the result is 1.0 (every label is within the top C).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`, or array of shape [N, C]): per-sample class scores (logits or
        probabilities; any monotone transform gives the same result). All rows must have the same length C.
    references (`list` of `int`, shape [N]): true class ids in [0, C).
    k (`int` or `list` of `int`, defaults to 1): how many of the highest-scoring classes count as a hit; must be
        >= 1. A list computes several top-k accuracies in one pass (one key each), which saves evaluate's costly
        storage of the [N, C] scores per call.

Returns:
    A dict with one float in [0, 1] per k. Key: ``"accuracy"`` for k = 1, ``f"top{k}_accuracy"`` otherwise
    (e.g. ``"top5_accuracy"``).

Examples:
    >>> metric = hf_sp.metrics.load_metric("top_k_accuracy")
    >>> metric.compute(predictions=[[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], references=[2, 1], k=2)
    {'top2_accuracy': 1.0}
    >>> metric.compute(predictions=[[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], references=[2, 1])
    {'accuracy': 0.0}
    >>> metric.compute(predictions=[[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], references=[2, 1], k=[1, 2])
    {'accuracy': 0.0, 'top2_accuracy': 1.0}
"""

_CITATION = """
@article{russakovsky2015imagenet,
  title={ImageNet Large Scale Visual Recognition Challenge},
  author={Russakovsky, Olga and Deng, Jia and Su, Hao and Krause, Jonathan and Satheesh, Sanjeev and Ma, Sean and
          Huang, Zhiheng and Karpathy, Andrej and Khosla, Aditya and Bernstein, Michael and Berg, Alexander C. and
          Fei-Fei, Li},
  journal={International Journal of Computer Vision},
  volume={115},
  number={3},
  pages={211--252},
  year={2015}
}
"""


def top_k_key(k: int) -> str:
    """Result key for top-k accuracy: ``"accuracy"`` for k = 1, ``f"top{k}_accuracy"`` otherwise."""
    return "accuracy" if k == 1 else f"top{k}_accuracy"


def true_class_rank(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[N] int array: ``rank_i(labels[i])``, the 0-based rank of the true class (see the module description)."""
    scores = np.where(np.isnan(scores), -np.inf, scores)
    n, c = scores.shape
    true_scores = scores[np.arange(n), labels][:, None]
    higher = (scores > true_scores).sum(axis=1)
    tied_before = ((scores == true_scores) & (np.arange(c)[None, :] < labels[:, None])).sum(axis=1)
    return higher + tied_before


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1 (or a list of them), got {k!r}")
    return int(k)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.top_k_accuracy_score.html"
            ],
        )

    def _compute(self, predictions, references, k: int | Sequence[int] = 1) -> dict[str, float]:
        ks = [_check_k(k)] if isinstance(k, (int, np.integer)) else [_check_k(kk) for kk in k]
        if not ks:
            raise ValueError("k must be an integer >= 1 or a non-empty list of them")
        labels = np.asarray(references, dtype=np.int64)
        if labels.size == 0:
            raise ValueError("top_k_accuracy needs at least one sample")
        try:
            scores = np.asarray(predictions, dtype=np.float32)
        except ValueError as e:  # ragged rows
            raise ValueError("all prediction score vectors must have the same length (number of classes)") from e
        if scores.ndim != 2 or scores.shape[0] != labels.shape[0] or scores.shape[1] == 0:
            raise ValueError(
                f"predictions must have shape [N, C] with C >= 1 and N = len(references) = {labels.shape[0]}, "
                f"got {scores.shape}"
            )
        num_classes = scores.shape[1]
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"references must be class ids in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]"
            )
        rank = true_class_rank(scores, labels)
        return {top_k_key(kk): float((rank < kk).mean()) for kk in ks}
