#!/usr/bin/env python
"""Reproduce the paper's comparison (L2 vs L2-SP, L1-SP, Group-Lasso-SP, L2-SP-Fisher, plus a linear probe).

On an imagefolder data set with train/, val/ and test/ (alpha per method chosen on val, then 3 seeds):

    python scripts/reproduce.py --data_dir data/mytask --output_dir results/mytask

On a Hub data set, with classes and a fixed number of images per class chosen by file-name hash:

    python scripts/reproduce.py --dataset_name tanganke/dtd --output_dir results/dtd-5 \
        --classes banded blotchy braided bubbly bumpy --resplit --shots_per_class train=20,validation=20,test=40

The settings used for results/dtd10 on a 2-core CPU, data from the Hub (see configs/reproduce_dtd10.yaml; a local
copy of the official release with --data_dir dtd/images):

    python scripts/reproduce.py --config configs/reproduce_dtd10.yaml

A smaller comparison, with your own grids:

    python scripts/reproduce.py --data_dir data/mytask --output_dir results/mytask \\
        --methods l2 l2_sp --alpha_grid l2=1e-4,1e-3 l2_sp=0.01,0.1,1 --seeds 0 1 2 \\
        --image_size 128 --num_train_epochs 15

Killed? Run the same command again: finished runs are skipped, a half-finished run resumes from its
checkpoint. Every option is listed by ``--help``; ``--config sweep.yaml`` reads them from YAML.
"""

from hf_sp_research.reproduce import main

if __name__ == "__main__":
    main()
