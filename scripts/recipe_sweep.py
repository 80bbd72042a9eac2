#!/usr/bin/env python
"""Compare fine-tuning recipes: L2, L2-SP, the linear probe, LP-FT and LP-FT + L2-SP, with and without frozen
BatchNorm and interpolation toward the start, every choice made on val (see hf_sp_research/recipe_sweep.py).

    python scripts/recipe_sweep.py --config configs/recipes_dtd10.yaml
    python scripts/recipe_sweep.py --config configs/recipes_dtd10.yaml --data_dir path/to/dtd10   # a local copy

Killed? Run the same command again: finished runs are skipped.
"""

from hf_sp_research.recipe_sweep import main

if __name__ == "__main__":
    main()
