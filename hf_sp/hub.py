"""The end of a fine-tuning run: the model card beside the saved model, and the push to the Hub."""

from __future__ import annotations

import logging

from huggingface_hub.errors import HfHubHTTPError

from .trainer import SPTrainer

logger = logging.getLogger(__name__)


class PushError(RuntimeError):
    """The push to the Hub failed; everything is still saved locally."""


def finish_and_push(trainer: SPTrainer, metrics: dict[str, float]) -> None:
    """Write the model card to ``output_dir/README.md``; push model and card when ``push_to_hub`` is set.

    A failed push loses nothing: the model, card, results and checkpoints stay in ``output_dir``, and
    the error says how to upload them again.
    """
    args = trainer.args
    dataset = (getattr(trainer, "sp_card_context", {}) or {}).get("dataset_name")
    trainer.create_model_card(dataset_name=dataset)
    if not args.push_to_hub:
        return
    try:
        trainer.push_to_hub(commit_message="hf_sp: fine-tuned model, card and results", dataset_name=dataset)
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise PushError(
            f"Pushing {args.output_dir} to {args.hub_model_id} failed: {type(err).__name__}: {err}. Nothing was lost: "
            f"the model, card and checkpoints are in {args.output_dir}. Upload them again with "
            f"`hf upload {args.hub_model_id} {args.output_dir} --exclude 'checkpoint-*'`."
        ) from err
