"""Peak host memory per rank while a ZeRO-3 run loads its base model: whole on every rank vs partitioned.

Builds locally (no download) a LLaVA stand-in shaped like a hub checkpoint: a CLIP ViT-B/16 vision tower
(768 x 12 layers, 224 px), a Llama LLM of hidden 1024 x 8 layers (``--llm-layers``) and vocab 32064 (~254M
parameters in all), saved with ``save_pretrained`` in bf16 (sharded safetensors) under a temporary directory. Then, for each
loading mode, starts ``--ranks`` real DeepSpeed ranks (CPU, gloo) that load it, patch MoLE and run
``deepspeed.initialize`` under ZeRO-3, each recording its peak resident set (``VmHWM``) after start-up
(imports), after loading and after ``deepspeed.initialize``:

* ``full``: every rank builds the whole model with ``from_pretrained``; ``deepspeed.initialize`` partitions it
  (the way before partitioned loading);
* ``hf_zero3``: transformers' own DeepSpeed integration (``HfDeepSpeedConfig`` before ``from_pretrained``):
  built under ``zero.Init``, but rank 0 reads the whole state dict and the others receive it module by module;
* ``partitioned``: ``mole_ds.train.model_loading.load_partitioned``: built under ``zero.Init``, each rank reads
  only its own flat range of every tensor from the safetensors files.

Prints a table (model bytes, peak RSS per rank per mode, ratio to model bytes / world) and writes JSON.

    python tools/bench_load.py --out-json bench_load.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("full", "hf_zero3", "partitioned")
MiB = 2 ** 20


def vm_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def standin_config(llm_layers: int = 8):
    """LLaVA-1.5 layout at a benchmarkable size: CLIP ViT-B/16 tower, Llama 1024 x ``llm_layers``, vocab 32064."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=16, projection_dim=512)
    text = LlamaConfig(vocab_size=32064, hidden_size=1024, intermediate_size=2752, num_hidden_layers=llm_layers,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096, pad_token_id=0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


def build_standin(out: Path, llm_layers: int = 8) -> dict:
    """Save the stand-in in bf16 (random weights, 200 MB shards) to ``out``; its parameter count and bytes."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(standin_config(llm_layers)).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, max_shard_size="200MB")
    del model
    files = sorted(out.glob("*.safetensors"))
    return {"params": n, "model_bytes": 2 * n, "files": len(files),
            "file_bytes": sum(f.stat().st_size for f in files)}


def worker(args) -> None:
    """One rank: load in ``args.mode``, patch MoLE, deepspeed.initialize; write its peak RSS at each stage."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from mole_ds import MoLEConfig
    from mole_ds.patching import patch_model
    from mole_ds.train.model_loading import cast_unpartitioned, load_base

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
          "zero_optimization": {"stage": 3}, "bf16": {"enabled": args.dtype == "bf16"},
          "zero_allow_untested_optimizer": True}
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    dist.barrier()
    rec = {"rank": rank, "world": world, "mode": args.mode, "start_rss_kib": vm_kib("VmRSS"),
           "start_hwm_kib": vm_kib("VmHWM")}
    t0 = time.perf_counter()
    if args.mode == "hf_zero3":
        from transformers import LlavaForConditionalGeneration
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(dict(ds))  # noqa: F841  (transformers holds it by weak reference)
        model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype, local_files_only=True)
    else:
        model = load_base(args.model, ds, dtype, partitioned=args.mode == "partitioned")
    rec["load_s"] = time.perf_counter() - t0
    rec["after_load_hwm_kib"] = vm_kib("VmHWM")
    rec["after_load_rss_kib"] = vm_kib("VmRSS")
    patch_model(model, MoLEConfig(num_experts=4, top_k=1, rank=8, alpha=16.0))
    cast_unpartitioned(model, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    rec["init_s"] = time.perf_counter() - t0
    rec["peak_hwm_kib"] = vm_kib("VmHWM")
    rec["after_init_rss_kib"] = vm_kib("VmRSS")
    held = 0
    for p in engine.module.parameters():
        t = getattr(p, "ds_tensor", None)
        held += (t.numel() * t.element_size()) if t is not None else p.numel() * p.element_size()
    rec["param_bytes_held"] = held
    Path(args.record).with_name(f"{Path(args.record).stem}_rank{rank}.json").write_text(json.dumps(rec))
    dist.barrier()


def launch(mode: str, model: Path, ranks: int, dtype: str, work: Path) -> list[dict]:
    from mole_ds.runtime import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    record = work / f"{mode}_{dtype}.json"
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(ranks), "--master_port",
           str(free_port()), str(Path(__file__).resolve()), "--worker", "--mode", mode, "--model", str(model),
           "--dtype", dtype, "--record", str(record)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"{mode} ({dtype}) failed ({res.returncode}):\n{(res.stdout + res.stderr)[-4000:]}")
    return [json.loads((work / f"{record.stem}_rank{r}.json").read_text()) for r in range(ranks)]


def table(info: dict, results: dict, ranks: int) -> str:
    mb = info["model_bytes"]
    lines = [f"LLaVA stand-in: {info['params'] / 1e6:.1f}M parameters, {mb / MiB:.0f} MiB in bf16 "
             f"({info['files']} safetensors shards); {ranks} ranks, ZeRO-3; model bytes / world = "
             f"{mb / ranks / MiB:.0f} MiB",
             f"{'mode':<12} {'dtype':<5} {'rank':>4} {'start MiB':>10} {'peak MiB':>9} {'peak-start':>11} "
             f"{'x bytes/world':>14} {'held MiB':>9} {'load s':>7}"]
    for (mode, dtype), recs in results.items():
        per_world = (mb if dtype == "bf16" else 2 * mb) / ranks
        for r in recs:
            grow = (r["peak_hwm_kib"] - r["start_rss_kib"]) * 1024
            lines.append(f"{mode:<12} {dtype:<5} {r['rank']:>4} {r['start_rss_kib'] / 1024:>10.0f} "
                         f"{r['peak_hwm_kib'] / 1024:>9.0f} {grow / MiB:>11.0f} {grow / per_world:>14.2f} "
                         f"{r['param_bytes_held'] / MiB:>9.0f} {r['load_s']:>7.1f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {MODES}")
    ap.add_argument("--dtypes", default="bf16", help="training precision(s): bf16, fp32 (comma-separated)")
    ap.add_argument("--llm-layers", type=int, default=8,
                    help="Llama layers of the stand-in (8: 254M parameters; each layer adds 12.6M): run two sizes "
                         "to see which part of the peak grows with the model")
    ap.add_argument("--out-json", default="bench_load.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bf16", help=argparse.SUPPRESS)
    ap.add_argument("--record", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"--modes: unknown {bad}; choose from {MODES}")
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        work = Path(tmp)
        info = {**build_standin(work / "model", args.llm_layers), "llm_layers": args.llm_layers}
        results = {}
        for dtype in args.dtypes.split(","):
            for mode in modes:
                results[(mode, dtype)] = launch(mode, work / "model", args.ranks, dtype, work)
    text = table(info, results, args.ranks)
    print(text)
    Path(args.out_json).write_text(json.dumps({
        "model": info, "ranks": args.ranks, "zero_stage": 3, "table": text,
        "runs": [{"mode": m, "dtype": d, "ranks": recs} for (m, d), recs in results.items()]}, indent=1))
    print(f"wrote {args.out_json}")


if __name__ == "__main__":
    main()
