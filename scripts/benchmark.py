#!/usr/bin/env python
"""Cost benchmark of hf_sp: SPTrainer vs Trainer step time and peak memory, the penalty kernel, Fisher estimation.

The reported run (resnet50 and vit_small_patch16_224, batch 32, 224 px, 2 CPU threads; about 15 minutes on 2
idle cores, longer on a shared machine):

    python scripts/benchmark.py --out results/benchmark

Smoke test (timm test_resnet / test_vit at 32 px, a couple of steps; well under a minute):

    python scripts/benchmark.py --quick --out /tmp/bench-quick

Smaller images, more repetitions, one model, only some sections:

    python scripts/benchmark.py --models resnet50 --image_size 128 --repeats 5 --sections step penalty

Re-summarize a saved run from its raw per-run numbers (measures nothing):

    python scripts/benchmark.py --render results/benchmark/benchmark.json

Writes OUT/benchmark.json (raw numbers, machine, versions, command) and OUT/benchmark.md (tables).
Every option: ``python scripts/benchmark.py --help`` (the logic lives in ``hf_sp_research.benchmark``).
"""

from hf_sp_research.benchmark import main

if __name__ == "__main__":
    main(prog="scripts/benchmark.py")
