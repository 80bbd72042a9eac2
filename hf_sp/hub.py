"""The end of a fine-tuning run: the model card beside the saved model, and the push to the Hub."""

from __future__ import annotations

import importlib
import logging

from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError

from .trainer import SPTrainer

logger = logging.getLogger(__name__)


class PushError(RuntimeError):
    """The push to the Hub failed; everything is still saved locally."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub's HTTP client is httpx (1.x) or httpx2 (2.x): their connection and timeout errors, plus
    # OSError (sockets, requests-based clients).
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


#: What reaching the Hub raises when it cannot be reached (a wrong HF_ENDPOINT, a network down).
UNREACHABLE = _transport_errors()


def hub_unreachable(err: BaseException, hub_model_id: str | None, output_dir: str) -> PushError:
    """One line for a Hub that ``--push_to_hub`` cannot reach at start (nothing is trained or lost yet)."""
    return PushError(
        f"--push_to_hub: could not reach the Hub at {constants.ENDPOINT} to create {hub_model_id!r} "
        f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else 'no answer'}). Nothing was "
        f"trained. Check HF_ENDPOINT and the network, or train now without --push_to_hub and push later with "
        f"`hf upload {hub_model_id} {output_dir} --exclude 'checkpoint-*'`."
    )


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
