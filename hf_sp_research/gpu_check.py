"""The GPU check: what the CPU benchmark cannot show, in one command of a few minutes on one GPU.

1. **Step time** of :class:`hf_sp.SPTrainer` (``l2_sp``) against ``transformers.Trainer`` for resnet50 and
   vit_small at batch 64, 224 px, in bf16 and in fp16 (GradScaler), both with the fused AdamW (the GPU
   default); runs alternate SP / baseline, CUDA-synchronized per-step times, medians after warm-up.
2. **The penalty alone**: SP's step hook (``optimizer.step()`` of an optimizer whose own update does nothing)
   against the per-tensor autograd loop and the memory-traffic floor (16 bytes per anchored fp32 entry at the
   measured device bandwidth).
3. **Sharded engines at world size 1**: FSDP2 and DeepSpeed ZeRO-3 each train a small transformers ViT with
   ``l2_sp`` in one process (their sharded code paths run with one rank), each in its own subprocess; a run
   resumed from its mid-run checkpoint must end where the uninterrupted run ends, and the saved model must
   load in plain ``transformers`` (``AutoModelForImageClassification``) with the trained weights.

``--dry-run`` runs every section on the CPU with tiny models (the sharded engines are then reported as skipped
and a plain single-process run checks resume and loading): the suite tests it. Writes ``gpu_check.json`` and
``gpu_check.md`` after each section (``meta.complete`` is false until all have run), so a run stopped at a time
limit keeps what it measured; a section, or one model of it, that raises is recorded with its error and the
others go on. ``--sections`` runs some of them. Nothing here asserts on a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .machine import machine_info

__all__ = ["main", "run_check"]

ENGINES = ("fsdp2", "deepspeed_zero3")

#: The sections in the order they run: name on the command line -> key in the results.
SECTIONS = {"step": "step_time", "penalty": "penalty", "sharded": "sharded"}

#: Seconds an engine's run (its own process: uninterrupted, resumed, loaded) may take.
ENGINE_TIMEOUT_S = 300


def _log(message: str) -> None:
    print(f"[gpu_check {datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


def _failure(what: str, error: BaseException) -> dict[str, str]:
    """The record of a part that raised: its error and the end of its traceback."""
    _log(f"{what} failed: {type(error).__name__}: {error}")
    return {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _plan(dry_run: bool) -> dict[str, Any]:
    if dry_run:
        return {
            "models": ["test_resnet", "test_vit"],
            "precisions": ["no"],
            "image_size": 32,
            "batch_size": 4,
            "warmup": 1,
            "steps": 2,
            "repeats": 1,
            "optim": "adamw_torch",
            "penalty_iters": 3,
        }
    return {
        "models": ["resnet50", "vit_small_patch16_224"],
        "precisions": ["bf16", "fp16"],
        "image_size": 224,
        "batch_size": 64,
        "warmup": 5,
        "steps": 20,
        "repeats": 2,
        "optim": "adamw_torch_fused",
        "penalty_iters": 50,
    }


# ------------------------------------------------------------------------------------------------
# 1. Step time
def _train_steps(model_name: str, sp: bool, precision: str, plan: dict[str, Any], device: torch.device) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_sp import SPConfig, SPTrainer
    from hf_sp_research.benchmark import SyntheticImages, create_wrapped_model

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[float] = []
            self._t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            _sync(device)
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            self.steps.append(time.perf_counter() - self._t0)

    total = plan["warmup"] + plan["steps"]
    model = create_wrapped_model(model_name, 10, plan["image_size"], 0)
    data = SyntheticImages(plan["batch_size"] * total, plan["image_size"], 10)
    with tempfile.TemporaryDirectory() as tmp:
        common = {
            "output_dir": tmp,
            "per_device_train_batch_size": plan["batch_size"],
            "max_steps": total,
            "learning_rate": 1e-4,
            "optim": plan["optim"],
            "bf16": precision == "bf16",
            "fp16": precision == "fp16",
            "report_to": [],
            "save_strategy": "no",
            "logging_steps": 10,
            "disable_tqdm": True,
            "use_cpu": device.type == "cpu",
            "dataloader_num_workers": 0,
        }
        args = SPConfig(**common, sp_penalty="l2_sp") if sp else TrainingArguments(**common)
        timer = Timer()
        (SPTrainer if sp else Trainer)(model=model, args=args, train_dataset=data, callbacks=[timer]).train()
    return {"steps_s": timer.steps, "median_s": statistics.median(timer.steps[plan["warmup"] :])}


def step_times(plan: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in plan["models"]:
        for precision in plan["precisions"]:
            key = f"{model}/{precision}"
            runs: dict[str, list[float]] = {"sp": [], "baseline": []}
            try:
                for _ in range(plan["repeats"]):
                    for mode in ("sp", "baseline"):
                        runs[mode].append(_train_steps(model, mode == "sp", precision, plan, device)["median_s"])
            except Exception as error:  # noqa: BLE001 - recorded, the other models and precisions go on
                out[key] = {**_failure(f"step {key}", error), "runs": runs}
                continue
            sp, base = statistics.median(runs["sp"]), statistics.median(runs["baseline"])
            out[key] = {"sp_s": sp, "baseline_s": base, "overhead_pct": 100 * (sp / base - 1), "runs": runs}
            _log(f"step {key}: SP {sp * 1e3:.1f} ms, Trainer {base * 1e3:.1f} ms ({out[key]['overhead_pct']:+.2f}%)")
    return out


# ------------------------------------------------------------------------------------------------
# 2. The penalty alone
def _time(fn, device: torch.device, iters: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bandwidth(device: torch.device, iters: int) -> float:
    """Bytes per second of ``torch.add(a, b, out=c)`` on fp32 tensors far larger than the caches."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 22)
    a, b, c = (torch.rand(numel, device=device) for _ in range(3))
    return 12 * numel / _time(lambda: torch.add(a, b, out=c), device, iters)


def penalty_times(plan: dict[str, Any], device: torch.device) -> dict[str, Any]:
    bandwidth = _bandwidth(device, plan["penalty_iters"])
    out: dict[str, Any] = {"bandwidth_GB_per_s": bandwidth / 1e9}
    for name in plan["models"]:
        try:
            out[name] = _penalty_for(name, plan, device, bandwidth)
        except Exception as error:  # noqa: BLE001 - recorded, the other models go on
            out[name] = _failure(f"penalty {name}", error)
    return out


def _penalty_for(name: str, plan: dict[str, Any], device: torch.device, bandwidth: float) -> dict[str, Any]:
    """SP's step hook, eager and compiled (``sp_compile``), against the per-tensor loop and the floor, on ``name``'s
    anchored parameters (random gradients). A compiler failure is recorded beside the eager figures."""
    from hf_sp import split_parameters
    from hf_sp.regularizer import ANCHOR_KEY, SPRegularizer
    from hf_sp_research.benchmark import FLOOR_BYTES_PER_ENTRY, NullOptimizer, create_wrapped_model

    model = create_wrapped_model(name, 10, plan["image_size"], 0).to(device)
    split = split_parameters(model)
    anchored = [model.get_parameter(n) for n in split.anchored]
    for p in model.parameters():
        p.grad = torch.randn_like(p)

    def stepper(compile: bool) -> tuple[NullOptimizer, SPRegularizer]:
        optimizer = NullOptimizer(model.parameters())
        reg = SPRegularizer("l2_sp", alpha=0.1, beta=0.01, split=split, compile=compile)
        reg.prepare_optimizer(optimizer, model.named_parameters())
        reg.capture_allowed = True
        return optimizer, reg

    optimizer, reg = stepper(compile=False)
    optimizer.step()
    compiled, compiled_failure, first_step_s = None, None, 0.0
    try:  # the compiled kernel (sp_compile), on its own anchors; its first step compiles
        compiled = stepper(compile=True)
        t0 = time.perf_counter()
        compiled[0].step()
        _sync(device)
        first_step_s = time.perf_counter() - t0
    except Exception as error:  # noqa: BLE001 - a missing or failing compiler toolchain: the eager figures stand
        compiled, compiled_failure = None, _failure(f"penalty {name}, sp_compile", error)
    with torch.no_grad():
        for p in anchored:
            p.add_(torch.randn_like(p), alpha=0.01)
    anchors = [optimizer.state[p][ANCHOR_KEY] for p in anchored]

    def loop() -> None:
        sum(0.5 * torch.norm(p - p0) ** 2 for p, p0 in zip(anchored, anchors, strict=True)).backward()

    hook_s = _time(optimizer.step, device, plan["penalty_iters"])
    loop_s = _time(loop, device, plan["penalty_iters"])
    reg.pop_metrics()
    entries = sum(p.numel() for p in anchored)
    floor_s = FLOOR_BYTES_PER_ENTRY * entries / bandwidth
    out: dict[str, Any] = {
        "anchored_numel": entries,
        "step_hook_s": hook_s,
        "autograd_loop_s": loop_s,
        "floor_s": floor_s,
        "step_hook_x_floor": hook_s / floor_s,
        "speedup_vs_loop": loop_s / hook_s,
    }
    _log(
        f"penalty {name}: step hook {hook_s * 1e3:.2f} ms ({hook_s / floor_s:.2f}x floor), loop "
        f"{loop_s * 1e3:.2f} ms ({loop_s / hook_s:.2f}x slower)"
    )
    if compiled is None:
        return {**out, "compiled": compiled_failure}
    compiled_s = _time(compiled[0].step, device, plan["penalty_iters"])
    compiled[1].pop_metrics()
    out.update(
        compiled_step_hook_s=compiled_s,
        compiled_step_hook_x_floor=compiled_s / floor_s,
        compiled_first_step_s=first_step_s,
    )
    _log(
        f"penalty {name}: sp_compile {compiled_s * 1e3:.2f} ms ({compiled_s / floor_s:.2f}x floor, first step "
        f"{first_step_s:.0f} s)"
    )
    return out


# ------------------------------------------------------------------------------------------------
# 3. Sharded engines, one process each
def _engine_args(engine: str, precision: str) -> dict[str, Any]:
    if engine == "fsdp2":
        return {
            "fsdp": "full_shard",
            "fsdp_config": {
                "fsdp_version": 2,
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "transformer_layer_cls_to_wrap": ["ViTLayer"],
                "state_dict_type": "FULL_STATE_DICT",
            },
        }
    if engine == "deepspeed_zero3":
        return {
            "deepspeed": {
                "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
                "bf16": {"enabled": precision == "bf16"},
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "train_batch_size": "auto",
            }
        }
    return {}


def _tiny_vit():
    """The sharded runs' model: a small transformers ViT, seeded."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


def _sharded_child(engine: str, out_dir: str, device_type: str) -> dict[str, Any]:
    """An uninterrupted run and one resumed from its mid-run checkpoint under ``engine`` (world size 1), each
    saving its final model in ``out_dir``; the parent loads them (:func:`_published`)."""
    if engine in ENGINES:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from hf_sp import SPConfig, SPTrainer
    from hf_sp_research.benchmark import SyntheticImages

    precision = "bf16" if device_type == "cuda" else "no"
    root = Path(out_dir)

    def args(name: str) -> SPConfig:
        return SPConfig(
            output_dir=str(root / name),
            per_device_train_batch_size=8,
            max_steps=6,
            save_strategy="steps",
            save_steps=3,
            logging_steps=2,
            learning_rate=1e-3,
            optim="adamw_torch",
            sp_penalty="l2_sp",
            sp_alpha=0.1,
            bf16=precision == "bf16",
            report_to=[],
            disable_tqdm=True,
            use_cpu=device_type == "cpu",
            **_engine_args(engine, precision),
        )

    data = SyntheticImages(48, 32, 10)
    full = SPTrainer(model=_tiny_vit(), args=args("full"), train_dataset=data)
    full.train()
    full.save_model(str(root / "full" / "final"))
    again = SPTrainer(model=_tiny_vit(), args=args("resumed"), train_dataset=data)
    again.train(resume_from_checkpoint=str(root / "full" / "checkpoint-3"))
    again.save_model(str(root / "resumed" / "final"))
    return {
        "status": "ok",
        "precision": precision,
        "engine_used": {"fsdp2": full.is_fsdp_enabled, "deepspeed_zero3": full.is_deepspeed_enabled}.get(engine, True),
        "sp_metrics_logged": any("sp_dist" in h for h in full.state.log_history),
        "sp_dist": [h["sp_dist"] for h in full.state.log_history if "sp_dist" in h],
    }


def _published(root: Path, precision: str) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """The two runs' saved models as plain transformers loads them (in this process, which set up no engine:
    under a DeepSpeed ZeRO-3 configuration, ``from_pretrained`` would partition the weights it loads), and the
    uninterrupted run's weights."""
    from transformers import AutoModelForImageClassification

    a = AutoModelForImageClassification.from_pretrained(str(root / "full" / "final"))
    b = AutoModelForImageClassification.from_pretrained(str(root / "resumed" / "final"))
    start = _tiny_vit().state_dict()
    sa, sb = a.state_dict(), b.state_dict()
    complete = all(sa[k].shape == start[k].shape == sb[k].shape for k in start) and sa.keys() == start.keys()
    if not complete:
        return {"loads_in_transformers": False, "error": "the saved weights are not the model's (partitioned?)"}, None
    diff = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
    moved = max(float((sa[k].float() - start[k].float()).abs().max()) for k in sa)
    with torch.no_grad():
        logits = a(pixel_values=torch.randn(2, 3, 32, 32)).logits
    facts = {
        "resume_max_abs_diff": diff,
        "resume_equal": diff <= _tolerance(precision),
        "trained_max_abs_change": moved,
        "loads_in_transformers": type(a).__name__ == "ViTForImageClassification" and moved > 0,
        "logits_finite": bool(torch.isfinite(logits).all()),
    }
    return facts, sa


def _same_values(a: list[float], b: list[float], precision: str) -> bool:
    """Whether two runs logged the same values (relative: 1e-4 in fp32, 5e-2 in bf16)."""
    rel = 1e-4 if precision == "no" else 5e-2
    return len(a) == len(b) and all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b, strict=True))


def _tolerance(precision: str) -> float:
    """Largest difference between two runs that should end alike: fp32 rounding, or bf16's."""
    return 1e-5 if precision == "no" else 1e-2


def _engines(device: torch.device) -> tuple[list[str], dict[str, Any]]:
    """The runs of the sharded section, and those skipped with the reason: FSDP2 and DeepSpeed ZeRO-3 on CUDA; on
    the CPU a plain run and DeepSpeed ZeRO-3 (its CPU accelerator, gloo), where DeepSpeed is installed
    (transformers takes FSDP on GPUs only)."""
    skipped: dict[str, Any] = {}
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        skipped["deepspeed_zero3"] = {"status": "skipped: deepspeed is not installed"}
    if device.type != "cuda":
        skipped["fsdp2"] = {"status": "skipped: transformers takes FSDP on GPUs only"}
    return ["single_process", *(e for e in ENGINES if e not in skipped)], skipped


def _run_engine(engine: str, device: torch.device) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """``engine``'s runs in their own process, then the models they saved loaded here: the record, and the
    uninterrupted run's final weights (``None`` where they are missing)."""
    with tempfile.TemporaryDirectory(prefix=f"hf_sp_{engine}_") as tmp:
        cmd = [sys.executable, "-m", "hf_sp_research.gpu_check", "--sharded-child", engine, tmp, device.type]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=ENGINE_TIMEOUT_S)
        except subprocess.TimeoutExpired as error:
            parts = (error.stdout, error.stderr)
            log = "".join(t.decode(errors="replace") if isinstance(t, bytes) else t or "" for t in parts)
            return {"status": f"timed out ({ENGINE_TIMEOUT_S} s)", "log_tail": log[-3000:]}, None
        result_path = Path(tmp) / "result.json"
        if proc.returncode != 0 or not result_path.is_file():
            return {"status": f"failed ({proc.returncode})", "log_tail": (proc.stdout + proc.stderr)[-3000:]}, None
        record = json.loads(result_path.read_text())
        try:
            facts, final = _published(Path(tmp), record["precision"])
        except Exception as error:  # noqa: BLE001 - recorded beside the run's own facts
            facts, final = {"loads_in_transformers": False, **_failure(f"loading {engine}", error)}, None
        return {**record, **facts}, final


def sharded(plan: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Each engine of :func:`_engines` (:func:`_run_engine`; ``plan`` is not used: the engines train their own small
    ViT), each engine's final weights and logged distance against the single process's."""
    runs, out = _engines(device)
    reference: dict[str, torch.Tensor] | None = None
    for engine in runs:
        t0 = time.perf_counter()
        out[engine], final = _run_engine(engine, device)
        if engine == "single_process":
            reference = final
        elif final is not None and reference is not None:  # the engine changes nothing but the layout
            r = out[engine]
            diff = max(float((final[k].float() - reference[k].float()).abs().max()) for k in reference)
            r["single_process_max_abs_diff"] = diff
            r["equals_single_process"] = diff <= _tolerance(r["precision"])
            # the logged distance to the start: summed over ranks and sub-groups once
            r["sp_dist_equals_single_process"] = _same_values(
                r["sp_dist"], out["single_process"]["sp_dist"], r["precision"]
            )
        out[engine]["seconds"] = time.perf_counter() - t0
        _log(f"sharded {engine}: {out[engine]['status']}")
    return out


# ------------------------------------------------------------------------------------------------
def _failed(r: Any) -> str | None:
    return r.get("error") if isinstance(r, dict) else None


def render_markdown(result: dict[str, Any]) -> str:
    """``gpu_check.md``: the sections that ran, each part that failed with its error."""
    meta = result["meta"]
    duration = f"{meta['duration_s'] / 60:.1f} min" if "duration_s" in meta else "stopped before its end"
    lines = [
        "# hf_sp GPU check",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Device: {meta['device']}; torch {meta['machine']['torch']}, transformers {meta['machine']['transformers']}, "
        f"accelerate {meta['accelerate']}, deepspeed {meta['deepspeed']}. {duration}.",
        "",
    ]
    if meta["dry_run"]:
        lines += ["**Dry run on the CPU with tiny models: the numbers only show that every section runs.**", ""]
    if not meta["complete"]:
        ran = ", ".join(k for k in SECTIONS.values() if k in result) or "none"
        lines += [f"**Incomplete: sections written so far: {ran}.**", ""]
    for key, title, render in (
        ("step_time", "## 1. Step time: SPTrainer (l2_sp) vs Trainer", _render_steps),
        ("penalty", "## 2. The penalty alone", _render_penalty),
        ("sharded", "## 3. Sharded engines at world size 1 (l2_sp)", _render_sharded),
    ):
        if key not in result:
            continue
        lines += [title, ""]
        section = result[key]
        lines += [f"Failed: `{_failed(section)}`"] if _failed(section) else render(section)
        lines.append("")
    return "\n".join(lines)


def _render_steps(section: dict[str, Any]) -> list[str]:
    lines = ["| model / precision | Trainer | SPTrainer | overhead |", "|---|---:|---:|---:|"]
    for key, r in section.items():
        if _failed(r):
            lines.append(f"| {key} | failed: `{_failed(r)}` | | |")
            continue
        times = f"{r['baseline_s'] * 1e3:.1f} ms | {r['sp_s'] * 1e3:.1f} ms"
        lines.append(f"| {key} | {times} | {r['overhead_pct']:+.2f}% |")
    return lines


def _render_penalty(section: dict[str, Any]) -> list[str]:
    lines = [
        f"Bandwidth {section['bandwidth_GB_per_s']:.0f} GB/s.",
        "",
        "| model | anchored entries | step hook | x floor | step hook, sp_compile (first step) | x floor "
        "| autograd loop | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in section.items():
        if not isinstance(r, dict):
            continue
        if _failed(r):
            lines.append(f"| {name} | failed: `{_failed(r)}` | | | | | | |")
            continue
        compiled = (
            f"{r['compiled_step_hook_s'] * 1e3:.2f} ms ({r['compiled_first_step_s']:.0f} s) "
            f"| {r['compiled_step_hook_x_floor']:.2f}x"
            if "compiled_step_hook_s" in r
            else f"failed: `{_failed(r['compiled'])}` | -"
        )
        lines.append(
            f"| {name} | {r['anchored_numel'] / 1e6:.1f} M | {r['step_hook_s'] * 1e3:.2f} ms "
            f"| {r['step_hook_x_floor']:.2f}x | {compiled} | {r['autograd_loop_s'] * 1e3:.2f} ms "
            f"| {r['speedup_vs_loop']:.2f}x |"
        )
    return lines


def _render_sharded(section: dict[str, Any]) -> list[str]:
    lines = ["| engine | status | resume == uninterrupted (max abs diff) | = one process (max abs diff) "]
    lines[-1] += "| loads in transformers |"
    lines.append("|---|---|---|---|---|")
    for engine, r in section.items():
        if r.get("status") != "ok":
            lines.append(f"| {engine} | {r['status']} | - | - | - |")
        elif "resume_equal" not in r:
            lines.append(f"| {engine} | ok; loading failed: `{_failed(r)}` | - | - | False |")
        else:
            status = "ok" if r.get("engine_used", True) else "ran without the engine"
            resume = f"{r['resume_equal']} ({r['resume_max_abs_diff']:.1e})"
            same = "-"
            if "equals_single_process" in r:
                same = f"{r['equals_single_process']} ({r['single_process_max_abs_diff']:.1e})"
            lines.append(f"| {engine} | {status} | {resume} | {same} | {r['loads_in_transformers']} |")
    return lines


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _write(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_check.md").write_text(render_markdown(result))


def run_check(
    out_dir: str | os.PathLike, dry_run: bool, command: str, sections: Sequence[str] = tuple(SECTIONS)
) -> dict[str, Any]:
    """Run ``sections`` (names of :data:`SECTIONS`), writing ``gpu_check.json`` and ``gpu_check.md`` in ``out_dir``
    after each one."""
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"sections: unknown {unknown}; choose from {list(SECTIONS)}.")
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run with --dry-run to check the script on the CPU.")
    device = torch.device("cuda" if not dry_run else "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    plan = _plan(dry_run)
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    result: dict[str, Any] = {
        "meta": {
            "command": command,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "accelerate": _version("accelerate"),
            "deepspeed": _version("deepspeed"),
            "device": name,
            "dry_run": dry_run,
            "sections": [s for s in SECTIONS if s in sections],
            "complete": False,
        },
        "plan": plan,
    }
    out = Path(out_dir)
    runs = {"step": step_times, "penalty": penalty_times, "sharded": sharded}
    for section in result["meta"]["sections"]:
        try:
            result[SECTIONS[section]] = runs[section](plan, device)
        except Exception as error:  # noqa: BLE001 - recorded; the next section goes on
            result[SECTIONS[section]] = _failure(f"section {section}", error)
        _write(out, result)
    result["meta"]["duration_s"] = time.perf_counter() - t0
    result["meta"]["complete"] = True
    _write(out, result)
    _log(f"done in {result['meta']['duration_s'] / 60:.1f} min: {out / 'gpu_check.md'}")
    return result


def main(argv: Sequence[str] | None = None, prog: str = "scripts/gpu_check.py") -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/gpu_check", help="folder for gpu_check.json / gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="every section on the CPU with tiny models")
    parser.add_argument(
        "--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
        help="the sections to run (always in this order)",
    )
    args = parser.parse_args(argv)
    return run_check(args.out, args.dry_run, " ".join(["python", prog, *map(shlex.quote, argv)]), args.sections)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--sharded-child":
        engine, out_dir, device_type = sys.argv[2:5]
        Path(out_dir, "result.json").write_text(json.dumps(_sharded_child(engine, out_dir, device_type)))
    else:
        main(prog="-m hf_sp_research.gpu_check")
