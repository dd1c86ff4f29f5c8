#!/usr/bin/env python
"""Check the planner against real training steps: predicted vs measured peak memory per rank (and step time).

For each stand-in size (the LLaVA stand-ins of tools/bench_load.py: CLIP ViT-B/16 tower + Llama 1024 x 8 layers,
254M parameters, or x 24 layers, 457M) and each activation-checkpointing setting, starts ``--ranks`` real
DeepSpeed CPU ranks (gloo) that build the run with ``mole_ds.train.engine.setup_training`` (partitioned load,
MoLE patch, ZeRO-3, bf16) and run ``--steps`` training steps of ``--micro-batch`` x ``--max-length`` random
text tokens with ``train_step``. Each rank records its resident set: at the run's start (after imports and the
process group), after set-up, and per step the peak (``VmHWM``, reset through ``/proc/self/clear_refs``
just before the step) and the resident set just before it. The planner (``mole_ds.parallel.memory_model``,
preset ``cpu-gloo-here`` with this CPU's measured matmul rate) predicts the same run from the stand-in's
config.json alone; the table compares

* peak RSS above the run's start (max over steps and set-up) with the predicted ``model_peak``
  (static + transient tensors), and
* the step's peak above the resident set just before it with the predicted transient (activations, loss,
  ZeRO-3 gathers, gradient bucket),

and writes JSON. ``--quick`` runs the embedded tiny model instead (the dist test's fit check).

    python tools/bench_plan.py --out-json docs/results/bench_plan.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
MiB = 2 ** 20

from bench_load import vm_kib  # noqa: E402  (tools/ is on the path: one reader of /proc/self/status)


def reset_peak() -> None:
    """Reset VmHWM to the current resident set (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def mole_config(args):
    from mole_ds import MoLEConfig

    return MoLEConfig(num_experts=args.experts, top_k=1, rank=args.lora_rank, alpha=2.0 * args.lora_rank,
                      dropout=0.05, ep_size=args.ep)


def ds_config(args) -> dict:
    return {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
            "steps_per_print": 10 ** 9, "zero_optimization": {"stage": 3}, "bf16": {"enabled": args.dtype == "bf16"},
            "zero_allow_untested_optimizer": True}


def worker(args) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    from mole_ds.train.shm import release_own_shm_buffer

    release_own_shm_buffer()
    # Everything imported before the start figure: "start" is the stack with no model.
    import transformers  # noqa: F401
    from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: F401

    from mole_ds.train.config import ModelSection, RunConfig, TrainSection
    from mole_ds.train.engine import setup_training
    from mole_ds.train.step import train_step

    rank = dist.get_rank()
    dist.barrier()
    rec = {"rank": rank, "start_rss_kib": vm_kib("VmRSS")}
    model = (ModelSection(path=args.model) if args.model
             else ModelSection(tiny_layers=args.tiny_layers, tiny_hidden=args.tiny_hidden))
    cfg = RunConfig(model=model, mole=mole_config(args),
                    train=TrainSection(lr=1e-4, warmup_steps=0, max_steps=args.steps,
                                       gradient_checkpointing=args.worker_ckpt))
    cfg.data.max_length = args.max_length
    setup = setup_training(cfg, ds_config(args))
    engine = setup.engine
    if args.malloc_returns:
        # glibc keeps freed heap blocks resident (blocks under the 32 MiB mmap threshold that load_base leaves
        # set); with a 1 MiB mmap threshold and trim threshold, freed tensors go back to the system, so the
        # resident set follows the live tensors (the allocator-neutral measurement).
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    rec["setup_hwm_kib"] = vm_kib("VmHWM")
    rec["after_setup_rss_kib"] = vm_kib("VmRSS")
    vocab = engine.module.config.text_config.vocab_size if hasattr(engine.module.config, "text_config") \
        else engine.module.config.vocab_size
    g = torch.Generator().manual_seed(rank)
    steps = []
    for _ in range(args.steps):
        ids = torch.randint(5, min(vocab, 32000), (args.micro_batch, args.max_length), generator=g)
        dist.barrier()
        before = vm_kib("VmRSS")
        reset_peak()
        t0 = time.perf_counter()
        train_step(engine, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}])
        dt = time.perf_counter() - t0
        steps.append({"before_rss_kib": before, "peak_hwm_kib": vm_kib("VmHWM"), "after_rss_kib": vm_kib("VmRSS"),
                      "step_s": dt})
    rec["steps"] = steps
    Path(args.record).with_name(f"{Path(args.record).stem}_rank{rank}.json").write_text(json.dumps(rec))
    dist.barrier()


def launch(args, model: Path | None, ckpt: bool, work: Path, tag: str) -> list[dict]:
    from mole_ds.runtime import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    record = work / f"{tag}.json"
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(args.ranks), "--master_port",
           str(free_port()), str(Path(__file__).resolve()), "--worker", "--record", str(record),
           "--max-length", str(args.max_length), "--micro-batch", str(args.micro_batch), "--steps", str(args.steps),
           "--dtype", args.dtype, "--experts", str(args.experts), "--lora-rank", str(args.lora_rank),
           "--ep", str(args.ep), "--tiny-layers", str(args.tiny_layers), "--tiny-hidden", str(args.tiny_hidden)]
    if model is not None:
        cmd += ["--model", str(model)]
    if ckpt:
        cmd.append("--worker-ckpt")
    if args.malloc_returns:
        cmd.append("--malloc-returns")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"{tag} failed ({res.returncode}):\n{(res.stdout + res.stderr)[-4000:]}")
    return [json.loads((work / f"{record.stem}_rank{r}.json").read_text()) for r in range(args.ranks)]


def measure_flops(dtype: str, hidden: int, intermediate: int, tokens: int) -> float:
    """This CPU's matmul rate (1 thread) at the stand-in's MLP shape: the cpu-gloo-here preset's peak_flops."""
    import torch

    torch.set_num_threads(1)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(tokens, hidden, dtype=dt), torch.randn(hidden, intermediate, dtype=dt)
    a @ b
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * tokens * hidden * intermediate / statistics.median(times)


def predict(args, model_config, ckpt: bool, flops: float, runtime_bytes: int) -> dict:
    """The planner's figures for one run; ``runtime_bytes``: the preset's runtime term (start RSS + the
    stack's own overhead, measured with the tiny model)."""
    import dataclasses

    from mole_ds.parallel import memory_model as mm

    c = mm.census(model_config, mole_config(args))
    s = mm.setup_from(ds_config(args), c.mole, args.ranks, args.max_length, checkpointing=ckpt)
    dev = dataclasses.replace(mm.preset("cpu-gloo-here"), peak_flops=flops, runtime_bytes=runtime_bytes)
    mem = mm.plan_memory(c, s, dev)
    t = mm.plan_time(c, s, dev)
    return {"memory": mem.to_dict(), "time": t.to_dict(), "params": c.total, "peak_flops": flops}


def mm_runtime() -> int:
    from mole_ds.parallel import memory_model as mm

    return mm.preset("cpu-gloo-here").runtime_bytes


def summarise(recs: list[dict], pred: dict, overhead: float = 0.0) -> dict:
    """Measured vs predicted; ``overhead``: the stack's memory above the start that is not tensors (measured
    with the tiny model), added to the predicted model peak for the "above start" comparison."""
    rows = []
    for r in recs:
        start = r["start_rss_kib"] * 1024
        steady = r["steps"][1:] or r["steps"]  # step 1 traces ZeRO-3's fetch order; later steps keep modules
        peak_all = max([r["setup_hwm_kib"]] + [s["peak_hwm_kib"] for s in r["steps"]]) * 1024
        step_rise = max((s["peak_hwm_kib"] - s["before_rss_kib"]) * 1024 for s in steady)
        rows.append({"rank": r["rank"], "start_bytes": start, "peak_bytes": peak_all,
                     "peak_above_start": peak_all - start, "step_peak_above_before": step_rise,
                     "before_step_above_start": steady[0]["before_rss_kib"] * 1024 - start,
                     "step_s": statistics.median(s["step_s"] for s in steady)})
    m = pred["memory"]
    out = {"ranks": rows,
           "pred_model_peak": m["model_peak"] + overhead, "overhead": overhead, "pred_transient": m["transient"], "pred_static": m["static"],
           "pred_peak_total": m["peak"], "pred_step_s": pred["time"]["step_s"],
           "meas_peak_above_start": max(x["peak_above_start"] for x in rows),
           "meas_peak_total": max(x["peak_bytes"] for x in rows),
           "meas_step_rise": max(x["step_peak_above_before"] for x in rows),
           "meas_step_s": max(x["step_s"] for x in rows)}
    out["ratio_model_peak"] = out["pred_model_peak"] / out["meas_peak_above_start"]
    out["ratio_total"] = out["pred_peak_total"] / out["meas_peak_total"]
    out["ratio_step_rise"] = out["pred_transient"] / out["meas_step_rise"]
    return out


def table(results: list[dict]) -> str:
    lines = ["| model | ckpt | predicted MiB (static + transient) | measured peak - start MiB | ratio | predicted "
             "total MiB | measured peak RSS MiB | ratio | step transient pred / meas MiB | step s pred / meas |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {'on' if r['ckpt'] else 'off'} | {r['pred_model_peak'] / MiB:,.0f} "
                     f"({r['pred_static'] / MiB:,.0f} + {r['pred_transient'] / MiB:,.0f}) | "
                     f"{r['meas_peak_above_start'] / MiB:,.0f} | {r['ratio_model_peak']:.2f} | "
                     f"{r['pred_peak_total'] / MiB:,.0f} | {r['meas_peak_total'] / MiB:,.0f} | {r['ratio_total']:.2f} | "
                     f"{r['pred_transient'] / MiB:,.0f} / {r['meas_step_rise'] / MiB:,.0f} | "
                     f"{r['pred_step_s']:.1f} / {r['meas_step_s']:.1f} |")
    return "\n".join(lines)


def run(args) -> list[dict]:
    from bench_load import build_standin, standin_config

    results = []
    overhead, runtime = 0.0, None
    with tempfile.TemporaryDirectory(prefix="bench_plan_") as tmp:
        work = Path(tmp)
        sizes = [] if args.quick else [int(x) for x in args.llm_layers.split(",")]
        if sizes and args.calibrate:
            # The stack's own memory (imports done at "start"; DeepSpeed, gloo, allocator, the step's fixed
            # cost): peak RSS of the same run with the embedded tiny model, whose tensors are ~4 MiB.
            sizes = [0] + sizes
        for layers in sizes or [0]:
            if layers:
                path = work / f"standin_{layers}"
                info = build_standin(path, layers)
                from mole_ds.models.processor import build_tiny_processor

                build_tiny_processor(image_size=224, patch_size=16).save_pretrained(path)
                model_config, label = standin_config(layers), f"{info['params'] / 1e6:.0f}M ({layers} layers)"
                hidden, inter = 1024, 2752
            else:
                path = None
                from mole_ds.models.processor import build_tiny_processor
                from mole_ds.models.tiny import tiny_llava_config

                proc = build_tiny_processor(image_size=32, patch_size=8)
                model_config = tiny_llava_config(vocab_size=len(proc.tokenizer), image_token_id=proc.image_token_id,
                                                 pad_token_id=proc.tokenizer.pad_token_id, hidden_size=args.tiny_hidden,
                                                 intermediate_size=2 * args.tiny_hidden, num_layers=args.tiny_layers)
                label, hidden, inter = f"tiny ({args.tiny_layers} x {args.tiny_hidden})", args.tiny_hidden, 2 * args.tiny_hidden
            calibrating = layers == 0 and bool(sizes) and sizes[0] == 0
            # The tiny model has 512 positions: its runs use at most 256 tokens (its tensors stay ~MiB anyway).
            a = argparse.Namespace(**{**vars(args), "max_length": min(args.max_length, 256) if layers == 0
                                      else args.max_length})
            flops = measure_flops(args.dtype, hidden, inter, a.micro_batch * a.max_length)
            for ckpt in ([False] if calibrating else [c == "on" for c in args.ckpt.split(",")]):
                recs = launch(a, path, ckpt, work, f"run_{layers}_{int(ckpt)}")
                start = max(r["start_rss_kib"] for r in recs) * 1024
                runtime = mm_runtime() if args.use_preset_runtime else int(start + overhead)
                pred = predict(a, model_config, ckpt, flops, runtime)
                res = {"model": label, "llm_layers": layers, "ckpt": ckpt, **summarise(recs, pred, overhead),
                       "prediction": pred, "raw": recs}
                if calibrating:
                    overhead = res["meas_peak_above_start"] - pred["memory"]["model_peak"]
                    res["calibration"] = True
                    print(f"stack overhead above start (tiny model): {overhead / MiB:.0f} MiB", flush=True)
                results.append(res)
                print(table([res]).splitlines()[-1], flush=True)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--llm-layers", default="8,24", help="stand-in sizes (Llama layers: 8 -> 254M, 24 -> 457M)")
    ap.add_argument("--ckpt", default="off,on", help="activation checkpointing settings to run")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="the embedded tiny model instead of the stand-ins")
    ap.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                    help="skip the tiny-model run that measures the stack's own memory")
    ap.add_argument("--tiny-layers", type=int, default=2)
    ap.add_argument("--tiny-hidden", type=int, default=64)
    ap.add_argument("--malloc-returns", action="store_true",
                    help="after set-up, make glibc return freed memory (1 MiB mmap/trim thresholds): RSS then follows "
                         "live tensors instead of the allocator's retained heap")
    ap.add_argument("--use-preset-runtime", action="store_true",
                    help="predict with the cpu-gloo-here preset's runtime figure instead of this run's start RSS + "
                         "the tiny-model calibration")
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-ckpt", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--record", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results = run(args)
    text = table(results)
    print(text)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "worker"},
                                                   "table": text, "results": results}, indent=1))
        print(f"wrote {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
