"""SPTrainer under FSDP2 or DeepSpeed ZeRO-3 through transformers and accelerate, on CPU: 2 ranks (gloo) against one
process.

python tests/scripts/sharded_trainer.py OUT_DIR none CASE [FISHER OTHER_FISHER]             # one process, batches of 8
torchrun --standalone --nproc_per_node 2 tests/scripts/sharded_trainer.py OUT_DIR fsdp2 CASE [...]  # 4 a rank
torchrun --standalone --nproc_per_node 2 tests/scripts/sharded_trainer.py OUT_DIR zero3 CASE [...]

DeepSpeed runs on its CPU accelerator (gloo), its parameters partitioned over the ranks. accelerate sets FSDP up on
accelerators only: a CPU run of several processes becomes DDP. :func:`fsdp_on_cpu` makes
the state that accelerate builds take the FSDP plugin that Trainer passes, as it does on GPUs, so that Trainer's
own FSDP2 code runs: accelerate shards the model with ``fully_shard`` (DTensor parameters), the optimizer steps
them, gradient accumulation skips the gradient sync as FSDP2 does, and checkpoints are written and read back
(``SHARDED_STATE_DICT``: ``pytorch_model_fsdp_0``, ``optimizer_0`` by ``torch.distributed.checkpoint``;
``FULL_STATE_DICT``: ``model.safetensors``, ``optimizer.bin``). Each run trains ``STEPS`` steps with a checkpoint
half-way; under an engine a second trainer then resumes from that checkpoint, with a model of other weights and, for
the Fisher penalty, another Fisher file (``OTHER_FISHER``): both must come from the checkpoint. Rank 0 writes each
run's full weights (``{run}.safetensors``), its logged records (``metrics.json``) and ``engine.json`` (whether
accelerate still ran FSDP2 after training, whether the parameters were DTensors, FSDP2's compute dtype, the
anchors' dtypes and rank 0's share of the anchored entries); with ``FULL_STATE_DICT`` the
uninterrupted run also publishes its model with ``save_model`` (``published/``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

STEPS = 6
#: Each case's settings beyond the common ones, in float64 unless bf16: group lasso also accumulates gradients and
#: clips them; the Fisher penalty's checkpoints hold full state dicts, the others' are sharded.
CASES = {
    "l2_sp": {"sp_penalty": "l2_sp"},
    "group_lasso_sp": {"sp_penalty": "group_lasso_sp", "gradient_accumulation_steps": 2, "max_grad_norm": 1.0},
    "l2_sp_fisher": {"sp_penalty": "l2_sp_fisher", "state_dict_type": "FULL_STATE_DICT"},
    "l2_sp_bf16": {"sp_penalty": "l2_sp", "bf16": True},
}


def fsdp_on_cpu() -> None:
    """Let a multi-process CPU run take the FSDP plugin (accelerate would make it DDP): the accelerator state and the
    process state it copies its type from again at each construction, as accelerate sets both on GPUs."""
    import accelerate.state
    from accelerate.utils import DistributedType

    init = accelerate.state.AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            if self._mixed_precision != "no":  # FSDP2's MixedPrecisionPolicy, as accelerate sets it on GPUs
                fsdp_plugin.set_mixed_precision(self._mixed_precision)

    accelerate.state.AcceleratorState.__init__ = __init__


def full_weights(trainer) -> dict[str, torch.Tensor]:
    """The model's full weights (gathered from the shards or partitions; every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if trainer.is_deepspeed_enabled:
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped) or {}  # rank 0's, the others' empty
    elif trainer.is_fsdp_enabled:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(trainer.model_wrapped, options=options)
    else:
        state = trainer.model.state_dict()
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def _anchors(trainer) -> list[torch.Tensor]:
    """This rank's anchors (local shards or partitions)."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    anchors = [s["sp_anchor"] for s in optimizer.state.values() if "sp_anchor" in s]
    return [getattr(a, "_local_tensor", a) for a in anchors]


def anchor_share(trainer) -> float:
    """This rank's share of all the ranks' anchored entries (every rank must call it): 1 in one process, about
    1 / world size where the engine shards the parameters and their anchors."""
    local = torch.tensor(float(sum(a.numel() for a in _anchors(trainer))), dtype=torch.float64)
    total = local.clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return float(local / total)


def main(out: Path, engine_name: str, case: str, fishers: list[str]) -> None:
    from hf_sp import SPConfig, SPTrainer
    from hf_sp_research.benchmark import SyntheticImages
    from hf_sp_research.gpu_check import _tiny_vit

    sharded = engine_name != "none"
    variant = dict(CASES[case])
    state_dict_type = variant.pop("state_dict_type", "SHARDED_STATE_DICT")
    if engine_name == "zero3":
        engine_args = {
            "deepspeed": {
                "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "train_batch_size": "auto",
            }
        }
    elif sharded:
        fsdp_on_cpu()
        engine_args = {
            "fsdp": "full_shard",
            "fsdp_config": {
                "fsdp_version": 2,
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "transformer_layer_cls_to_wrap": ["ViTLayer"],
                "state_dict_type": state_dict_type,
            },
            "ddp_backend": "gloo",
        }
    else:
        engine_args = {}

    accumulate = variant.get("gradient_accumulation_steps", 1)

    def args(name: str, fisher: str | None) -> SPConfig:
        return SPConfig(
            output_dir=str(out / name),
            per_device_train_batch_size=(4 if sharded else 8) // accumulate,
            max_steps=STEPS,
            save_strategy="steps",
            save_steps=STEPS // 2,
            logging_steps=1,
            learning_rate=0.05,  # SGD, momentum 0.9 (the default with a penalty): Adam would blow the key bias's
            # zero gradient (its rounding) up to steps of the learning rate
            sp_alpha=0.1,
            sp_fisher_path=fisher,
            sp_beta=0.01,
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            seed=0,
            **engine_args,
            **variant,
        )

    # float64 unless bf16 (float32 weights): group lasso's unit vectors turn fp32 rounding into visible steps
    dtype = torch.float32 if variant.get("bf16") else torch.float64
    data = SyntheticImages(48, 32, 10)
    data.x = data.x.to(dtype)
    fisher, other_fisher = (fishers + [None, None])[:2]
    runs = {"full": SPTrainer(model=_tiny_vit().to(dtype), args=args("full", fisher), train_dataset=data)}
    runs["full"].train()
    if sharded:
        model = _tiny_vit().to(dtype)  # other weights than the start: the anchors must come from the checkpoint
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype), alpha=0.05)
        runs["resumed"] = SPTrainer(model=model, args=args("resumed", other_fisher), train_dataset=data)
        runs["resumed"].train(resume_from_checkpoint=str(out / "full" / f"checkpoint-{STEPS // 2}"))
        if state_dict_type == "FULL_STATE_DICT" and engine_name == "fsdp2":
            runs["full"].save_model(str(out / "published"))
    weights = {name: full_weights(trainer) for name, trainer in runs.items()}
    share = anchor_share(runs["full"])
    if int(os.environ.get("RANK", "0")) == 0:
        for name, state in weights.items():
            save_file(state, out / f"{name}.safetensors")
        logged = {name: [h for h in t.state.log_history if "sp_dist" in h] for name, t in runs.items()}
        (out / "metrics.json").write_text(json.dumps(logged))
        full = runs["full"]
        dtensors = all(type(p).__name__ == "DTensor" for p in full.model_wrapped.parameters())
        policies = {
            str(m._get_fsdp_state()._mp_policy.param_dtype)
            for m in full.model_wrapped.modules()
            if hasattr(m, "_get_fsdp_state")
        }
        facts = {
            "deepspeed": full.is_deepspeed_enabled,
            "fsdp2": full.accelerator.is_fsdp2,
            "dtensors": dtensors,
            "fsdp2_param_dtypes": sorted(policies),
            "anchor_dtypes": sorted({str(a.dtype) for a in _anchors(full)}),
            "anchor_share": share,
        }
        (out / "engine.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:])
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: a thread that gloo leaves behind aborted a finished rank (SIGABRT)
