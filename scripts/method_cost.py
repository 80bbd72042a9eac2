#!/usr/bin/env python
"""Cost per training step of each transfer method (SPD, projection, FTP, DELTA, BSS, L2-SP) as a ratio to plain
fine-tuning in the same run (see hf_sp_research/method_cost.py).

    python scripts/method_cost.py --out results/benchmark/methods
"""

from hf_sp_research.method_cost import main

if __name__ == "__main__":
    main()
