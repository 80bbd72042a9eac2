"""Model card of a model fine-tuned with starting-point (SP) regularization.

The card is rendered with huggingface_hub's :class:`~huggingface_hub.ModelCard` from the Jinja template
``hf_sp_model_card.md`` (shipped as ``hf_sp/model_cards/`` in the wheel, at ``<repo>/model_cards/`` in a source
checkout). Its YAML front matter carries the Hub metadata (base model, data set, tags, ``model-index`` evaluation
results); its text records the penalty and its formula, alpha, beta, what was anchored to the pretrained weights
``w0`` and what was new, the final distance to the start, the training hyperparameters, the framework versions,
how to load the model (without ``hf_sp``) and the paper's citation.

Example:
    >>> info = SPCardInfo(model_id="me/vit-dogs-l2sp", base_model="google/vit-base-patch16-224", ...)
    >>> render_model_card(info).save("out/README.md")
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

import hf_sp

__all__ = [
    "SPCardInfo",
    "hyperparameters_from_args",
    "model_card_template_path",
    "render_model_card",
    "sanitize_hyperparameters",
    "with_trainer_card_arguments",
]

TEMPLATE_NAME = "hf_sp_model_card.md"

#: Packages whose versions the card lists (missing ones are skipped).
FRAMEWORKS = ("hf_sp", "transformers", "timm", "torch", "datasets", "accelerate", "huggingface_hub")

#: A hyperparameter whose (lower-cased) name contains one of these is never written to the card.
SENSITIVE_KEY_PARTS = (
    "token",
    "secret",
    "password",
    "passwd",
    "hub_token",
    "push_to_hub_token",
    "api_key",
    "apikey",
    "credential",
    "private_key",
)

#: Values that look like a Hugging Face access token: a string starting with ``hf_``, or one embedding a token.
_HF_TOKEN_IN_TEXT = re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{16,}")

#: Metric-name prefixes written by ``Trainer.evaluate`` / ``predict`` and the data split they stand for.
_SPLIT_PREFIXES = {"eval": "validation", "validation": "validation", "val": "validation", "test": "test"}

#: Metrics kept in the text but not in the ``model-index`` (bookkeeping, not model quality).
_NOT_MODEL_INDEX = ("loss", "runtime", "samples_per_second", "steps_per_second", "epoch", "step", "distance")

#: A Hub repo id: ``name`` or ``namespace/name`` (letters, digits, ``-``, ``_``, ``.``).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.\-]*/)?[A-Za-z0-9][\w.\-]*$")


@dataclass
class SPCardInfo:
    """Everything the model card of an SP fine-tuning run records.

    Attributes:
        model_id: Hub repo id (``"me/vit-dogs-l2sp"``) or the output directory's name; ``None`` if unknown.
        base_model: The pretrained model fine-tuned: a Hub id (``"timm/tf_efficientnet_lite0.in1k"``, ``"hf-hub:"``
            prefix allowed) or a local path. Local paths are only named in the text, never in the metadata.
        library: ``"transformers"`` or ``"timm"`` (the format the model was saved in).
        dataset_name: The target data set (a Hub id such as ``"beans"``, or a local name/path); ``None`` if unknown.
        penalty: The ``sp_penalty`` name, e.g. ``"l2_sp"`` (``"none"`` for plain fine-tuning).
        penalty_formula: ``hf_sp.get_penalty_info(penalty).formula`` (``""`` for ``"none"``).
        alpha: Strength on the pretrained tensors ``w_S``.
        beta: L2 strength on the new head ``w_Sbar``.
        mode: ``"gradient"`` or ``"decoupled"``.
        include: ``"kernels"`` or ``"all"``.
        anchored: One-line summary of what was anchored to ``w0`` (tensor and parameter counts).
        new: What was new (head modules and counts).
        final_distance: ``||w_S - w0_S||`` at the end of training.
        relative_distance: ``||w_S - w0_S|| / ||w0_S||`` at the end of training.
        eval_results: Final metrics, e.g. ``{"eval_accuracy": 0.91, "eval_top5_accuracy": 0.99, "test_accuracy": 0.9}``.
            Keys prefixed ``eval_`` / ``test_`` are reported on the validation / test split.
        hyperparameters: Training hyperparameters (learning rate, batch sizes, epochs or steps, optimizer,
            scheduler, seed, mixed precision, ...). Secrets are filtered out (see :func:`sanitize_hyperparameters`).
        num_labels: Number of classes of the new head.
        label_names: Class names, in label-id order.
        task: Pipeline task of the model.
        tags: Extra Hub tags (the card always adds ``hf_sp``, the task, ``starting-point-regularization`` and the
            penalty name).
        license: Optional license identifier for the metadata (e.g. ``"apache-2.0"``).
        language: Languages for the metadata (``Trainer.push_to_hub(language=...)``).
        model_name: Display name (title) of the model; default: from ``model_id``.
        dataset_tags: Hub data set ids for the metadata; default: ``dataset_name`` when it is one.
        dataset_args: Arguments (configuration) of the evaluation data set, for the ``model-index``.
    """

    model_id: str | None
    base_model: str | None
    library: str
    dataset_name: str | None
    penalty: str
    penalty_formula: str
    alpha: float
    beta: float
    mode: str
    include: str
    anchored: str
    new: str
    final_distance: float | None
    relative_distance: float | None
    eval_results: dict[str, float]
    hyperparameters: dict[str, Any]
    num_labels: int | None
    label_names: list[str] | None
    task: str = "image-classification"
    tags: list[str] = field(default_factory=list)
    license: str | None = None
    language: list[str] | None = None
    model_name: str | None = None
    dataset_tags: list[str] | None = None
    dataset_args: str | None = None

    #: ``(setting, value)`` rows of the other transfer methods of the recipe (probe head, BatchNorm, ...).
    method_rows: list[tuple[str, str]] = field(default_factory=list)
    #: A sentence per transfer method on what it did.
    method_notes: list[str] = field(default_factory=list)


def _as_list(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def with_trainer_card_arguments(
    info: SPCardInfo,
    *,
    language: str | list[str] | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
    model_name: str | None = None,
    finetuned_from: str | None = None,
    tasks: str | list[str] | None = None,
    dataset_tags: str | list[str] | None = None,
    dataset: str | list[str] | None = None,
    dataset_args: str | list[str] | None = None,
) -> SPCardInfo:
    """``info`` with the arguments of ``Trainer.create_model_card`` (those ``Trainer.push_to_hub(**kwargs)``
    passes on) applied, as Trainer's own card uses them: each given one overrides what the run recorded."""
    updates: dict[str, Any] = {"tags": [*info.tags, *(t for t in _as_list(tags) if t not in info.tags)]}
    for name, value in (
        ("license", license),
        ("model_name", model_name),
        ("base_model", finetuned_from),
        ("language", _as_list(language) or None),
        ("dataset_tags", _as_list(dataset_tags) or None),
    ):
        if value is not None:
            updates[name] = value
    if _as_list(tasks):
        updates["task"] = _as_list(tasks)[0]
    if _as_list(dataset):
        updates["dataset_name"] = _as_list(dataset)[0]
    if _as_list(dataset_args):
        updates["dataset_args"] = _as_list(dataset_args)[0]
    return dataclasses.replace(info, **updates)


def model_card_template_path() -> Path:
    """Path of the Jinja template ``hf_sp_model_card.md``.

    An installed wheel ships the template folder as ``hf_sp/model_cards/``; a source or editable checkout has it at
    the top of the repository, ``<repo>/model_cards/``.
    """
    package_dir = Path(hf_sp.__file__).resolve().parent
    folder = package_dir / "model_cards"
    if not folder.is_dir():
        folder = package_dir.parent / "model_cards"
    path = folder / TEMPLATE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"hf_sp model card template {TEMPLATE_NAME!r} not found in {package_dir / 'model_cards'} "
            f"nor in {package_dir.parent / 'model_cards'}."
        )
    return path


def _is_sensitive_key(key: Any) -> bool:
    lowered = str(key).lower()
    return any(part in lowered for part in SENSITIVE_KEY_PARTS)


def _looks_like_token(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    return value.strip().startswith("hf_") or _HF_TOKEN_IN_TEXT.search(value) is not None


def _sanitize_value(value: Any) -> tuple[bool, Any]:
    """``(keep, cleaned)`` for one hyperparameter value, recursing into mappings and sequences."""
    if _looks_like_token(value):
        return False, None
    if isinstance(value, Mapping):
        return True, sanitize_hyperparameters(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        cleaned = []
        for item in items:
            keep, item = _sanitize_value(item)
            if keep:
                cleaned.append(item)
        return True, cleaned
    return True, value


def sanitize_hyperparameters(hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of ``hyperparameters`` without anything secret, safe to publish in a model card.

    Drops every key whose name contains ``token``, ``secret``, ``password`` (``hub_token``, ``push_to_hub_token``,
    ...) or another credential word, and every value that looks like a Hugging Face access token (a string starting
    with ``hf_``, or embedding one). Nested mappings and sequences are cleaned the same way.
    """
    cleaned: dict[str, Any] = {}
    for key, value in hyperparameters.items():
        if _is_sensitive_key(key):
            continue
        keep, value = _sanitize_value(value)
        if keep:
            cleaned[str(key)] = value
    return cleaned


def hyperparameters_from_args(args: Any) -> dict[str, Any]:
    """The usual training hyperparameters of a ``TrainingArguments`` (or ``SPConfig``), for :class:`SPCardInfo`.

    Learning rate, batch sizes (per device, total), epochs or steps, optimizer, scheduler, warmup, seed, mixed
    precision and gradient clipping; fields the object lacks are skipped. The result is already sanitized.
    """
    hp: dict[str, Any] = {}

    def put(name: str, attr: str | None = None) -> None:
        value = getattr(args, attr or name, None)
        if value is not None and value != "":
            hp[name] = getattr(value, "value", value)  # enums (optim, scheduler) as their string

    put("learning_rate")
    put("per_device_train_batch_size")
    put("per_device_eval_batch_size")
    put("gradient_accumulation_steps")
    train_batch = getattr(args, "per_device_train_batch_size", None)
    if isinstance(train_batch, int):
        world_size = getattr(args, "world_size", 1) or 1
        hp["total_train_batch_size"] = (
            train_batch * int(getattr(args, "gradient_accumulation_steps", 1) or 1) * world_size
        )
    max_steps = getattr(args, "max_steps", -1)
    if isinstance(max_steps, int) and max_steps > 0:
        hp["max_steps"] = max_steps
    else:
        put("num_train_epochs")
    put("optimizer", "optim")
    put("optim_args")
    put("lr_scheduler_type")
    for name in ("warmup_steps", "warmup_ratio"):
        value = getattr(args, name, None)
        if value:
            hp[name] = value
    put("weight_decay")
    put("max_grad_norm")
    put("seed")
    if getattr(args, "bf16", False):
        hp["mixed_precision"] = "bf16"
    elif getattr(args, "fp16", False):
        hp["mixed_precision"] = "fp16"
    else:
        hp["mixed_precision"] = "no"
    return sanitize_hyperparameters(hp)


def _looks_like_hub_id(name: str | None) -> bool:
    """Whether ``name`` has the shape of a Hub repo id (``name`` or ``namespace/name``)."""
    return bool(name) and _HUB_ID.match(name) is not None and ".." not in name


def _is_hub_id(name: str | None) -> bool:
    """Whether ``name`` is a Hub repo id rather than a local path (an existing local path wins, as in
    ``from_pretrained``)."""
    return _looks_like_hub_id(name) and not os.path.exists(name)


def _hub_model_id(name: str | None) -> str | None:
    """``name`` as a Hub model id (``"hf-hub:"`` / ``"hf_hub:"`` prefix dropped), or ``None`` for a local path."""
    if not name:
        return None
    for prefix in ("hf-hub:", "hf_hub:"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name if _is_hub_id(name) else None


def _display_name(name: str) -> str:
    """The last component of a local path (directory layouts are not published)."""
    return Path(name.rstrip("/\\")).name or name


def _cell(value: Any) -> str:
    """One Markdown table cell."""
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value)
    elif isinstance(value, Mapping):
        text = ", ".join(f"{k}={v}" for k, v in value.items())
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _number(value: Any) -> Any:
    """A plain Python number (NumPy / torch scalars included) for YAML; other values unchanged."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _split_metric(key: str) -> tuple[str | None, str]:
    """``"eval_top5_accuracy"`` -> ``("validation", "top5_accuracy")``; unprefixed keys have no split."""
    prefix, _, rest = key.partition("_")
    if rest and prefix in _SPLIT_PREFIXES:
        return _SPLIT_PREFIXES[prefix], rest
    if rest and prefix == "train":
        return "train", rest
    return None, key


def _metric_pretty_name(metric: str, split: str | None) -> str:
    name = metric.replace("_", " ")
    name = re.sub(r"\btop(\d+)\b", r"top-\1", name)
    name = name[:1].upper() + name[1:]
    return f"{name} ({split})" if split else name


def _eval_results(info: SPCardInfo, dataset_type: str, dataset_pretty: str) -> list[EvalResult]:
    results = []
    for key, value in info.eval_results.items():
        split, metric = _split_metric(key)
        value = _number(value)
        if split == "train" or metric in _NOT_MODEL_INDEX or metric.endswith(_NOT_MODEL_INDEX):
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            continue
        results.append(
            EvalResult(
                task_type=info.task,
                task_name=info.task.replace("-", " ").title(),
                dataset_type=dataset_type,
                dataset_name=dataset_pretty,
                dataset_split=split,
                dataset_args=info.dataset_args,
                metric_type=metric,
                metric_name=_metric_pretty_name(metric, split),
                metric_value=value,
            )
        )
    return results


def _framework_versions() -> list[tuple[str, str]]:
    versions = []
    for name in FRAMEWORKS:
        try:
            versions.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _method_text(info: SPCardInfo) -> str:
    sp_paper = (
        "[Li, Grandvalet and Davoine, ICML 2018](https://arxiv.org/abs/1802.01483), with `hf_sp` and the "
        "Hugging Face `Trainer`"
    )
    if info.penalty == "none":
        return (
            "This run used no regularization penalty (`sp_penalty=none`): plain fine-tuning, the baseline of "
            f"starting-point regularization ({sp_paper})."
        )
    if info.penalty == "l2":
        return (
            "This run used the L2 baseline of starting-point regularization "
            f"({sp_paper}): the pretrained weights `w_S` decay toward **zero** with strength alpha, and the new "
            "classifier head `w_Sbar` with strength beta."
        )
    return (
        f"The model was fine-tuned with starting-point (SP) regularization ({sp_paper}). Instead of decaying the "
        "weights toward zero, the penalty pulls the tensors that come from the pretrained model, `w_S`, toward their "
        "starting point `w0_S` (the **pretrained weights w0**) with strength alpha, so the fine-tuned network keeps "
        "what it learned on the source task; the new classifier head `w_Sbar`, which has no starting point, gets "
        "plain L2 toward zero with strength beta. The training objective is `J(w) = loss(w) + Omega(w)`."
    )


def render_model_card(info: SPCardInfo) -> ModelCard:
    """Render the model card of an SP fine-tuning run with the ``hf_sp_model_card.md`` template.

    The metadata holds ``library_name``, ``pipeline_tag``, the tags (``hf_sp``, the task,
    ``starting-point-regularization``, the penalty name and ``info.tags``), ``base_model`` and ``datasets`` when they
    are Hub ids (a local path is only named in the text), the optional license, and the evaluation results as a
    ``model-index`` when both the model id and the data set are known. Hyperparameters are sanitized first: no
    token, secret or password reaches the card.

    Returns:
        A :class:`huggingface_hub.ModelCard`; ``card.save(output_dir / "README.md")`` writes it,
        ``card.push_to_hub(repo_id)`` uploads it.
    """
    base_hub_id = _hub_model_id(info.base_model)
    dataset_hub_id = info.dataset_name if _is_hub_id(info.dataset_name) else None
    if info.dataset_tags:
        dataset_hub_id = info.dataset_tags[0]
    model_name = None
    if info.model_id:
        model_name = info.model_id if _looks_like_hub_id(info.model_id) else _display_name(info.model_id)

    tags = ["hf_sp", info.task, "starting-point-regularization"]
    if info.penalty and info.penalty != "none":
        tags.append(info.penalty)
    if info.library and info.library != "transformers":
        tags.append(info.library)
    tags.extend(info.tags)

    eval_results: list[EvalResult] = []
    if model_name and info.dataset_name:
        dataset_type = dataset_hub_id or _display_name(info.dataset_name)
        eval_results = _eval_results(info, dataset_type, dataset_type)

    card_data = ModelCardData(
        base_model=base_hub_id,
        datasets=info.dataset_tags or ([dataset_hub_id] if dataset_hub_id else None),
        language=info.language,
        library_name=info.library,
        license=info.license,
        metrics=sorted({r.metric_type for r in eval_results}) or None,
        pipeline_tag=info.task,
        tags=tags,
        eval_results=eval_results or None,
        model_name=model_name if eval_results else None,
    )

    if info.base_model is None:
        base_model_text = "unknown"
    elif base_hub_id:
        base_model_text = f"[{base_hub_id}](https://huggingface.co/{base_hub_id})"
    else:
        base_model_text = f"a local checkpoint (`{_display_name(info.base_model)}`)"
    if info.dataset_name is None:
        dataset_text = "unknown"
    elif dataset_hub_id:
        dataset_text = f"[{dataset_hub_id}](https://huggingface.co/datasets/{dataset_hub_id})"
    else:
        dataset_text = f"a local data set (`{_display_name(info.dataset_name)}`)"

    labels_text = None
    if info.label_names:
        shown = [str(label).replace("`", "'") for label in info.label_names[:50]]
        labels_text = ", ".join(f"`{label}`" for label in shown)
        if len(info.label_names) > len(shown):
            labels_text += f", ... ({len(info.label_names) - len(shown)} more)"

    summary = (
        f"This `{info.task}` model was fine-tuned from {base_model_text} on {dataset_text} with `hf_sp`, "
        f"penalty `{info.penalty}`."
    )
    if info.relative_distance is not None:
        relative_distance_text = f"{info.relative_distance:.4g} ({100 * info.relative_distance:.3g}%)"
    else:
        relative_distance_text = "not recorded"

    eval_rows = []
    for key, value in info.eval_results.items():
        split, metric = _split_metric(key)
        eval_rows.append((_cell(_metric_pretty_name(metric, split)), _cell(_number(value))))
    hyperparameter_rows = [(_cell(k), _cell(v)) for k, v in sanitize_hyperparameters(info.hyperparameters).items()]

    return ModelCard.from_template(
        card_data,
        template_path=str(model_card_template_path()),
        model_title=info.model_name or model_name or f"{info.penalty} fine-tuned {info.task} model",
        summary=summary,
        task=info.task,
        library=info.library,
        base_model_text=base_model_text,
        dataset_text=dataset_text,
        num_labels=info.num_labels,
        labels_text=labels_text,
        license_text=info.license,
        method_text=_method_text(info),
        penalty=info.penalty,
        penalty_formula=info.penalty_formula,
        alpha=_cell(info.alpha),
        beta=_cell(info.beta),
        mode=info.mode,
        include=info.include,
        anchored=_cell(info.anchored),
        new=_cell(info.new),
        final_distance_text=f"{info.final_distance:.6g}" if info.final_distance is not None else "not recorded",
        relative_distance_text=relative_distance_text,
        eval_rows=eval_rows,
        method_rows=[(_cell(k), _cell(v)) for k, v in info.method_rows],
        method_notes=info.method_notes,
        hyperparameter_rows=hyperparameter_rows,
        framework_versions=_framework_versions(),
        repo=info.model_id if _looks_like_hub_id(info.model_id) else f"your-namespace/{model_name or 'model'}",
    )
