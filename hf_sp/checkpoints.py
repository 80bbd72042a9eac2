"""Which checkpoint a run resumes from: the newest complete one, never one cut short by a kill during its write."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

from safetensors import safe_open
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

__all__ = ["checkpoint_problem", "resume_checkpoint"]


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (a truncated or missing file), or ``None`` if it is complete.

    Cheap checks, no tensor is read: ``trainer_state.json`` (written last by Trainer) parses; every safetensors
    file has a whole header; every ``.pt`` / ``.bin`` archive has its zip directory (written at its end).
    """
    folder = Path(checkpoint)
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError) as err:
        return f"{state.name} is missing or unreadable ({type(err).__name__})"
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own SafetensorError for a truncated file
            return f"{path.name} is truncated or corrupt ({type(err).__name__}: {err})"
    for path in sorted([*folder.glob("*.pt"), *folder.glob("*.bin")]):
        if zipfile.is_zipfile(path):
            continue
        return f"{path.name} is truncated or corrupt"
    return None


def resume_checkpoint(output_dir: str | Path, requested: str | None = None) -> str | None:
    """The checkpoint to resume from: ``requested`` if given, else the newest complete one in ``output_dir``.

    Newer checkpoints that are incomplete (a run killed while writing one) are skipped with a warning naming
    them; ``None`` when there is none to resume from.

    Raises:
        ValueError: ``requested`` is incomplete (naming the file and what to do).
    """
    if requested is not None:
        problem = checkpoint_problem(requested)
        if problem:
            raise ValueError(
                f"resume_from_checkpoint={requested!r} cannot be resumed from: {problem}. Pass an earlier "
                "checkpoint, or delete this one and let the run resume from the newest complete checkpoint."
            )
        return requested
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    candidates = [p for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    for checkpoint in sorted(candidates, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return str(checkpoint)
        logger.warning("Skipping incomplete checkpoint %s: %s (it can be deleted).", checkpoint, problem)
    return None
