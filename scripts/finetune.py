#!/usr/bin/env python
"""Fine-tune a timm or transformers image classifier with starting-point regularization.

Offline default (packaged ImageNet EfficientNet-Lite0, L2-SP, scikit-learn digits):

    accelerate launch scripts/finetune.py

Real data in imagefolder layout:

    accelerate launch scripts/finetune.py \\
        --model_name_or_path packaged:tf_efficientnet_lite0 --image_size 128 \\
        --train_dir data/train --validation_dir data/val --test_dir data/test \\
        --sp_penalty l2_sp --sp_alpha 0.1 --sp_beta 0.01 --learning_rate 0.01 --num_train_epochs 15 \\
        --output_dir outputs/dtd10-l2sp

A Hub model and data set, on several GPUs, pushed to the Hub:

    accelerate launch --config_file examples/accelerate/ddp.yaml scripts/finetune.py \\
        --model_name_or_path timm/resnet50.a1_in1k --dataset_name <user>/<dataset> \\
        --bf16 --push_to_hub --hub_model_id <user>/resnet50-l2sp

Every SPConfig / TrainingArguments field is an option (``--help``); ``--config run.yaml`` reads them from YAML.
"""

from hf_sp.finetune import main

if __name__ == "__main__":
    main()
