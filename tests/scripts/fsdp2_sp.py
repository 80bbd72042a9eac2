"""SP's step hook on a timm ViT sharded by FSDP2 (``fully_shard``, CPU, gloo), against the same steps unsharded.

python tests/scripts/fsdp2_sp.py OUT_DIR PENALTY plain     # one process, no sharding: the reference
torchrun --nproc_per_node 2 tests/scripts/fsdp2_sp.py OUT_DIR PENALTY fsdp2

Every rank computes the loss of the same batch, so FSDP2's averaged gradients are the unsharded ones, and the
parameters (DTensors sharded on dim 0, some shards empty) must end where the unsharded run ends. After
``STEPS // 2`` steps the fsdp2 run also saves its model and optimizer state (the anchors in it) twice, sharded by
``torch.distributed.checkpoint`` and in full, and its optimizer state through accelerate's own FSDP2
``save_fsdp_optimizer`` (FULL and SHARDED state dicts), and finishes the run from each in a fresh model, optimizer
and regularizer that may not capture an anchor. Rank 0 writes ``final.safetensors`` (and one file per resumed run)
and ``metrics.json``, float64 throughout.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import timm
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn import functional as F

from hf_sp import split_parameters
from hf_sp.regularizer import SPRegularizer

STEPS = 4
VIT = dict(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=4)


def model_and_regularizer(penalty: str, sharded: bool, capture: bool):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT).double()
    split = split_parameters(model)
    fisher = None
    if penalty == "l2_sp_fisher":  # any positive diagonal, the same on every rank
        g = torch.Generator().manual_seed(2)
        fisher = {n: torch.rand(p.shape, generator=g, dtype=torch.float64) for n, p in model.named_parameters()}
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    reg = SPRegularizer(
        penalty, alpha=0.5, beta=0.3, split=split, fisher=fisher, all_reduce=all_reduce if sharded else None
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    reg.prepare_optimizer(optimizer, model.named_parameters())
    reg.capture_allowed = capture
    return model, optimizer, reg


def train(model, optimizer, reg, steps: range, metrics: list) -> None:
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(6, 3, 16, 16, generator=g, dtype=torch.float64), torch.arange(6) % 4) for _ in range(STEPS)
    ]
    for step in steps:
        x, y = batches[step]
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        metrics.append(reg.pop_metrics())


def full_state(model) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone().contiguous()
        for n, p in model.named_parameters()
    }


def resume(penalty: str, out: Path, full: bool, metrics: list) -> dict[str, torch.Tensor]:
    """A fresh model, optimizer and regularizer (no anchor may be captured) loaded from the checkpoint of
    :func:`main`, then the rest of the run. ``full``: the full state on every rank (``torch.load`` of one file, as
    accelerate's FULL_STATE_DICT), else sharded by ``torch.distributed.checkpoint`` into the fresh state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model, optimizer, reg = model_and_regularizer(penalty, sharded=True, capture=False)
    if full:
        state = torch.load(out / "full_state.pt", weights_only=True)
        options = StateDictOptions(full_state_dict=True)
    else:  # the fresh state is the template that the load fills
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(out / "checkpoint"))
        options = None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    train(model, optimizer, reg, range(STEPS // 2, STEPS), metrics)
    return full_state(model)


def _accelerate(kind: str):
    """What accelerate's FSDP2 optimizer checkpoints read of their plugin and accelerator (``kind``: "FULL" or
    "SHARDED", the plugin's state dict type): its own save and load functions run on them."""
    from types import SimpleNamespace

    from accelerate import PartialState
    from torch.distributed.fsdp import StateDictType

    PartialState(cpu=True)  # accelerate's logging asks for it (the process group is there already)

    plugin = SimpleNamespace(
        fsdp_version=2,
        state_dict_type=getattr(StateDictType, f"{kind}_STATE_DICT"),
        state_dict_config=SimpleNamespace(offload_to_cpu=kind == "FULL", rank0_only=False),
        optim_state_dict_config=SimpleNamespace(offload_to_cpu=kind == "FULL", rank0_only=False),
    )
    accelerator = SimpleNamespace(process_index=dist.get_rank(), wait_for_everyone=dist.barrier)
    return plugin, accelerator


def resume_through_accelerate(penalty: str, out: Path, kind: str, metrics: list) -> dict[str, torch.Tensor]:
    """As :func:`resume`, the optimizer loaded by accelerate's ``load_fsdp_optimizer`` from what its
    ``save_fsdp_optimizer`` wrote (``kind``: the state dict type), the model from the sharded checkpoint."""
    import torch.distributed.checkpoint as dcp
    from accelerate.utils.fsdp_utils import load_fsdp_optimizer
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model, optimizer, reg = model_and_regularizer(penalty, sharded=True, capture=False)
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(out / "checkpoint"))
    set_model_state_dict(model, state["model"])
    plugin, accelerator = _accelerate(kind)
    load_fsdp_optimizer(plugin, accelerator, optimizer, model, str(out / f"accelerate_{kind}"))
    train(model, optimizer, reg, range(STEPS // 2, STEPS), metrics)
    return full_state(model)


def main() -> None:
    out, penalty, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    out.mkdir(parents=True, exist_ok=True)
    sharded = mode == "fsdp2"
    if sharded:
        dist.init_process_group("gloo")
    runs = ("full", "resumed", "resumed_full", "accelerate_FULL", "accelerate_SHARDED")
    metrics: dict[str, list] = {run: [] for run in runs}
    model, optimizer, reg = model_and_regularizer(penalty, sharded, capture=True)
    train(model, optimizer, reg, range(STEPS // 2), metrics["full"])
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / "checkpoint"))
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        if dist.get_rank() == 0:
            torch.save({"model": model_sd, "optim": optim_sd}, out / "full_state.pt")
        dist.barrier()
        from accelerate.utils.fsdp_utils import save_fsdp_optimizer

        for kind in ("FULL", "SHARDED"):
            plugin, accelerator = _accelerate(kind)
            save_fsdp_optimizer(plugin, accelerator, optimizer, model, str(out / f"accelerate_{kind}"))
    train(model, optimizer, reg, range(STEPS // 2, STEPS), metrics["full"])
    states = {"final": full_state(model)}
    if sharded:
        states["resumed"] = resume(penalty, out, False, metrics["resumed"])
        states["resumed_full"] = resume(penalty, out, True, metrics["resumed_full"])
        for kind in ("FULL", "SHARDED"):
            run = f"accelerate_{kind}"
            states[run] = resume_through_accelerate(penalty, out, kind, metrics[run])
    if not sharded or dist.get_rank() == 0:
        for name, state in states.items():
            save_file(state, str(out / f"{name}.safetensors"))
        (out / "metrics.json").write_text(json.dumps(metrics))
    if sharded:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: a thread that gloo leaves behind can abort a finished rank


if __name__ == "__main__":
    main()
