"""Mean per-class accuracy (balanced accuracy), as an offline `evaluate` metric module.

Shipped inside ``hf_sp`` and loaded from its local path (``hf_sp.metrics.load_metric("mean_per_class_accuracy")``
or ``evaluate.load("<path>/mean_per_class_accuracy")``), so that no Hub access is needed.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Mean per-class accuracy (balanced accuracy): the mean over the classes present in the references of each class's
recall,

    recall_c = #{i : y_i = c and p_i = c} / #{i : y_i = c}
    mean_per_class_accuracy = (1 / |K|) * sum_{c in K} recall_c,    K = {c : #{i : y_i = c} > 0}

Classes that appear only in the predictions (or not at all) are left out of the mean, as in scikit-learn's
``balanced_accuracy_score`` (with ``adjusted=False``). With balanced classes it equals plain accuracy.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`, shape [N]): predicted class ids (e.g. ``logits.argmax(-1)``).
    references (`list` of `int`, shape [N]): true class ids.
    num_classes (`int`, optional): if given, every prediction and reference must lie in [0, num_classes), and the
        per-class recalls (if returned) have this length. It does not change the mean, which only runs over the
        classes present in the references.
    return_per_class (`bool`, defaults to False): also return ``"per_class_accuracy"``, the list of recall_c for
        c = 0 .. C - 1 (C = num_classes, or 1 + the largest id seen), NaN for classes absent from the references.

Returns:
    ``{"mean_per_class_accuracy": float}`` in [0, 1], plus ``"per_class_accuracy": list[float]`` if
    ``return_per_class``.

Examples:
    >>> metric = hf_sp.metrics.load_metric("mean_per_class_accuracy")
    >>> metric.compute(predictions=[0, 0, 0, 1], references=[0, 0, 0, 2])
    {'mean_per_class_accuracy': 0.5}
"""

_CITATION = """
@inproceedings{brodersen2010balanced,
  title={The Balanced Accuracy and Its Posterior Distribution},
  author={Brodersen, Kay Henning and Ong, Cheng Soon and Stephan, Klaas Enno and Buhmann, Joachim M.},
  booktitle={2010 20th International Conference on Pattern Recognition},
  pages={3121--3124},
  year={2010}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanPerClassAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.balanced_accuracy_score.html"
            ],
        )

    def _compute(
        self, predictions, references, num_classes: int | None = None, return_per_class: bool = False
    ) -> dict[str, float | list[float]]:
        preds = np.asarray(predictions, dtype=np.int64)
        labels = np.asarray(references, dtype=np.int64)
        if labels.size == 0:
            raise ValueError("mean_per_class_accuracy needs at least one sample")
        if preds.shape != labels.shape:
            raise ValueError(
                f"predictions and references must have the same length, got {preds.shape} and {labels.shape}"
            )
        lowest = min(preds.min(), labels.min())
        highest = max(preds.max(), labels.max())
        if lowest < 0:
            raise ValueError(f"class ids must be >= 0, got {lowest}")
        if num_classes is None:
            num_classes = int(highest) + 1
        elif isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        elif highest >= num_classes:
            raise ValueError(f"class ids must be < num_classes = {num_classes}, got {highest}")
        support = np.bincount(labels, minlength=num_classes)
        correct = np.bincount(labels[preds == labels], minlength=num_classes)
        present = support > 0
        recall = np.full(num_classes, np.nan)
        recall[present] = correct[present] / support[present]
        result: dict[str, float | list[float]] = {"mean_per_class_accuracy": float(recall[present].mean())}
        if return_per_class:
            result["per_class_accuracy"] = [float(r) for r in recall]
        return result
