"""Train a tiny timm ViT with SPTrainer and save the final weights: run alone or under accelerate launch.

python tests/scripts/train_tiny.py OUT_DIR BATCH_PER_DEVICE [PENALTY]

PENALTY "recipe": a timm CNN with every transfer method (probe head, frozen BatchNorm, per-role learning rates,
L2-SP, interpolation chosen on an eval set).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import ALL_METHODS, RandomImages, make_args, tiny_timm_cnn, tiny_timm_vit  # noqa: E402

from hf_sp import SPTrainer  # noqa: E402
from hf_sp.finetune import end_process_group  # noqa: E402


def main() -> None:
    out, batch = Path(sys.argv[1]), int(sys.argv[2])
    penalty = sys.argv[3] if len(sys.argv) > 3 else "l2_sp"
    recipe = penalty == "recipe"
    args = make_args(
        out.parent,
        output_dir=str(out),
        learning_rate=0.1,
        per_device_train_batch_size=batch,
        max_steps=4,
        # gloo: the CPU process group (transformers does not pick it by itself on CPU)
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        **{"sp_penalty": penalty, "sp_alpha": 0.5, **(ALL_METHODS if recipe else {}), "sp_beta": 0.3},
    )
    # float64, so that all-reduce rounding does not swamp the comparison where group lasso is non-smooth
    model = (tiny_timm_cnn() if recipe else tiny_timm_vit()).double()
    data = RandomImages(n=8, dtype=torch.float64)
    eval_data = RandomImages(n=8, seed=1, dtype=torch.float64) if recipe else None
    trainer = SPTrainer(model=model, args=args, train_dataset=data, eval_dataset=eval_data)
    trainer.train()
    if trainer.is_world_process_zero():
        state = {n: p.detach().contiguous() for n, p in trainer.model.named_parameters()}
        save_file(state, str(out / "final.safetensors"))
        logs = [{k: v for k, v in h.items() if k.startswith("sp_") or k == "loss"} for h in trainer.state.log_history]
        logs = [h for h in logs if h]
        (out / "logs.json").write_text(json.dumps(logs))
        print("world size", trainer.args.world_size, "steps", trainer.state.global_step, torch.__version__)
    end_process_group()
    # Everything is written: leave without the interpreter's teardown, where a thread that torch's gloo backend
    # leaves behind can abort a rank ("terminate called without an active exception", SIGABRT) after a finished run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
