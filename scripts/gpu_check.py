#!/usr/bin/env python
"""GPU check of hf_sp: SPTrainer vs Trainer step time (bf16, fp16, fused AdamW), the penalty vs the per-tensor loop,
FSDP2 and DeepSpeed ZeRO-3 at world size 1 (resume == uninterrupted, the saved model loads in transformers).

On one GPU (a few minutes):

    python scripts/gpu_check.py --out results/gpu_check

Every section on the CPU with tiny models (what the test suite runs):

    python scripts/gpu_check.py --dry-run --out /tmp/gpu-check

Some sections only (step, penalty, sharded), e.g. to finish a run that a time limit cut short:

    python scripts/gpu_check.py --sections sharded --out results/gpu_check/sharded

Writes OUT/gpu_check.json and OUT/gpu_check.md after each section (the logic lives in
``hf_sp_research.gpu_check``).
"""

from hf_sp_research.gpu_check import main

if __name__ == "__main__":
    main(prog="scripts/gpu_check.py")
