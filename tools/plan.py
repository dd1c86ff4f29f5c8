#!/usr/bin/env python
"""Will this run fit, and how fast will it step? Memory per rank and step time, before any GPU is allocated.

    python tools/plan.py --deepspeed ds_configs/zero3_ep.json [--config run.yaml] [--section.key value ...] \\
        --world-size 64 --gpu-mem 80GiB --preset h100-nvlink-ib \\
        [--model-config launchers/configs/models/llava-1.5-7b/config.json] [--out-json plan.json]

Takes the training run's own arguments (the DeepSpeed file with its "mole_ds" key, ``--config``, the
``--section.key value`` overrides; data sources are not needed), builds the model on the meta device from its
config.json alone (``model.path``'s, or ``--model-config``; nothing is read but the config), patches MoLE as
training does and prints per rank: parameter, gradient and optimizer bytes (frozen base and MoLE apart) for the
ZeRO stage and ep_size, ZeRO-3's transient gathers, activations with and without checkpointing at the
configured micro-batch and data.max_length, the predicted step time on the preset's GPU and fabric, and a
verdict for ``--gpu-mem``: fits, the largest micro-batch that fits, or what to change. ``mole.ep_size: auto``
is resolved as training resolves it (the cost model on the preset's link), among the placements that fit.
The arithmetic is mole_ds.parallel.memory_model (formulas in its docstring and docs/scaling.md).

Exit status: 0 fits (or no --gpu-mem given), 1 does not fit at the configured micro-batch, 2 refused
configuration (every problem named with its field and value).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GiB = 1 << 30


def parse_args(argv):
    from mole_ds.parallel.memory_model import PRESETS

    ap = argparse.ArgumentParser(prog="tools/plan.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--deepspeed", "--deepspeed_config", dest="deepspeed", required=True,
                    help="DeepSpeed JSON config (its 'mole_ds' key holds run settings)")
    ap.add_argument("--config", default=None, help="run config (YAML or JSON)")
    ap.add_argument("--world-size", type=int, default=1, help="ranks (GPUs) of the run")
    ap.add_argument("--gpu-mem", default=None, help="memory per GPU, e.g. 80GiB (default: the preset's)")
    ap.add_argument("--preset", default="h100-nvlink-ib", choices=sorted(PRESETS),
                    help="GPU and fabric figures (docs/scaling.md lists their sources)")
    ap.add_argument("--model-config", default=None, help="a config.json to use instead of model.path's")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="override train_micro_batch_size_per_gpu of the DeepSpeed config")
    ap.add_argument("--images-per-sample", type=int, default=None,
                    help="images per sample (default: 1 for a LLaVA model, 0 otherwise); each one is a frozen "
                         "vision-tower forward")
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return ap.parse_known_args(argv)


def tiny_config(section):
    """The embedded tiny LLaVA's config, as mole_ds.train.model_loading.build_model makes it."""
    from mole_ds.models.tiny import tiny_llava_config
    from mole_ds.train.model_loading import build_processor

    proc = build_processor(section)
    tok = proc.tokenizer
    return tiny_llava_config(vocab_size=len(tok), image_token_id=proc.image_token_id, pad_token_id=tok.pad_token_id,
                             hidden_size=section.tiny_hidden, intermediate_size=2 * section.tiny_hidden,
                             num_layers=section.tiny_layers)


def load(argv):
    """(run config, DeepSpeed config with bf16 resolved, model config source, args); raises ValueError
    (a ConfigError lists every problem)."""
    from mole_ds.config import ConfigError
    from mole_ds.parallel import memory_model as mm
    from mole_ds.train.config import check_against_deepspeed, load_run_config
    from mole_ds.train.launch import read_deepspeed_file

    args, overrides = parse_args(argv)
    ds, ours = read_deepspeed_file(args.deepspeed)
    cfg = load_run_config(args.config, overrides, base=ours)
    if args.micro_batch is not None:
        ds["train_micro_batch_size_per_gpu"] = args.micro_batch
        ds.pop("train_batch_size", None)
    problems = []
    if args.world_size < 1:
        problems.append(f"--world-size ({args.world_size}) must be >= 1")
    else:
        problems += check_against_deepspeed(cfg, ds, args.world_size)
    if cfg.data.max_length < 1:
        problems.append(f"data.max_length ({cfg.data.max_length}) must be >= 1")
    source = args.model_config or (str(Path(cfg.model.path) / "config.json") if cfg.model.path else None)
    if source is not None and not Path(source).is_file():
        problems.append(f"{'--model-config' if args.model_config else 'model.path'} ({source!r}) has no config.json")
    device = mm.preset(args.preset)
    if args.gpu_mem is not None:
        try:
            mm.parse_bytes(args.gpu_mem)
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(problems)
    bf = (ds.get("bf16") or {}).get("enabled")
    if bf == "auto":
        if device.kind == "cuda":
            bf = True
        else:
            from mole_ds.train.model_loading import bf16_supported

            bf = bf16_supported()[0]
    ds = copy.deepcopy(ds)
    ds["bf16"] = {**(ds.get("bf16") or {}), "enabled": bool(bf)}
    if cfg.model.dtype in ("bf16", "fp32"):
        ds["bf16"]["enabled"] = cfg.model.dtype == "bf16"
    return cfg, ds, source, args, device


def plan(cfg, ds: dict, source, args, device) -> dict:
    from mole_ds.config import ConfigError
    from mole_ds.parallel import cost_model as cm
    from mole_ds.parallel import memory_model as mm

    mole = None if cfg.model.train_base else cfg.mole
    census_mole = dataclasses.replace(mole, ep_size=1) if mole is not None else None
    c = mm.census(source if source else tiny_config(cfg.model), census_mole)
    images = args.images_per_sample if args.images_per_sample is not None else (1 if c.image_tokens else 0)
    ckpt = bool(getattr(cfg.train, "gradient_checkpointing", False))
    s = mm.setup_from(ds, census_mole, args.world_size, cfg.data.max_length, checkpointing=ckpt,
                      images_per_sample=images)
    budget = mm.parse_bytes(args.gpu_mem) if args.gpu_mem else device.memory_bytes
    link = device.link_figures()
    ep_note = ""
    if mole is not None and mole.ep_size == "auto":
        allowed = mm.fitting_ep_sizes(c, s, device, budget)
        w = cm.workload_from({"hidden": c.hidden, "intermediate": c.intermediate, "layers": c.layers}, mole, ds,
                             args.world_size, seq_len=cfg.data.max_length)
        w.ranks_per_node = device.ranks_per_node if device.ranks_per_node < args.world_size else 0
        chosen, costs = cm.choose_ep_size(w, link, allowed=allowed)
        s = dataclasses.replace(s, ep_size=chosen)
        ep_note = (f"mole.ep_size auto -> {chosen} (cost model on the {device.link} link; placements that fit: "
                   f"{allowed or 'none'})")
    elif mole is not None:
        s = dataclasses.replace(s, ep_size=int(mole.ep_size))
    bad = mm.problems(c, s)
    if bad:
        raise ConfigError(bad)
    mem = mm.plan_memory(c, s, device)
    t = mm.plan_time(c, s, device, link)
    v = mm.verdict(c, s, device, budget)
    other = mm.plan_memory(c, dataclasses.replace(s, checkpointing=not ckpt), device)
    return {"census": c, "setup": s, "memory": mem, "time": t, "verdict": v, "other_ckpt": other,
            "device": device, "budget": budget, "ep_note": ep_note, "images_per_sample": images}


def _g(x: float) -> str:
    return f"{x / GiB:8.2f}"


def report(r: dict) -> str:
    c, s, m, t, v, dev = r["census"], r["setup"], r["memory"], r["time"], r["verdict"], r["device"]
    trainable = c.numel(trainable=True)
    lines = [f"model: {c.total / 1e9:.2f}B parameters ({(c.total - trainable) / 1e9:.2f}B frozen base, "
             f"{trainable / 1e6:.1f}M trained: experts {c.numel(trainable=True, expert=True) / 1e6:.1f}M); "
             f"{c.layers} layers, hidden {c.hidden}, intermediate {c.intermediate}, vocab {c.vocab}",
             f"run: world {s.world_size}, ZeRO-{s.zero_stage}, ep_size {s.ep_size}, "
             f"{'bf16' if s.dtype_bytes == 2 else 'fp32'}, micro-batch {s.micro_batch} x {s.seq_len} tokens, "
             f"grad accumulation {s.grad_accum}, checkpointing {'on' if s.checkpointing else 'off'}, "
             f"{r['images_per_sample']} image(s)/sample"
             + (f"; E={c.mole.num_experts} top-{c.mole.top_k} r={c.mole.rank} ({c.mole.routing})" if c.mole else ""),
             f"device: {dev.name} ({dev.source})"]
    if r["ep_note"]:
        lines.append(r["ep_note"])
    ck_on = m.activations_ckpt
    ck_off = m.activations_no_ckpt
    lines += ["", f"per rank (GiB)                  {'frozen base':>11} {'MoLE':>8} {'total':>8}",
              f"  parameters                    {_g(m.base_params):>11} {_g(m.mole_params)} "
              f"{_g(m.base_params + m.mole_params)}",
              f"  gradients                     {_g(m.base_grads):>11} {_g(m.mole_grads)} "
              f"{_g(m.base_grads + m.mole_grads)}",
              f"  optimizer state               {_g(m.base_optim):>11} {_g(m.mole_optim)} "
              f"{_g(m.base_optim + m.mole_optim)}",
              f"  ZeRO-3 gathers (transient)                         {_g(m.zero3_gathers)}",
              f"  gradient bucket (transient)                        {_g(m.grad_bucket)}",
              f"  activations, no checkpointing{'  <- this run' if not s.checkpointing else '':13}        "
              f"{_g(ck_off)}",
              f"  activations, checkpointing{'  <- this run' if s.checkpointing else '':16}        {_g(ck_on)}",
              f"  runtime (context, buffers)                         {_g(m.runtime)}",
              f"  peak (tensors x {m.alloc_factor:.2f} + runtime)                  {_g(m.peak)}",
              f"  peak with checkpointing {'off' if s.checkpointing else 'on'}                        "
              f"{_g(r['other_ckpt'].peak)}",
              "",
              f"step time (predicted, per optimizer step): {t.step_s:.2f} s = max(compute {t.compute_s:.2f} s, "
              f"ZeRO traffic {t.zero_s + t.expert_comm_s - t.a2a_s:.2f} s) + expert all-to-all {t.a2a_s:.3f} s "
              f"(serial sum {t.step_serial_s:.2f} s); {t.flops / 1e12:.1f} TFLOP at MFU {dev.mfu:.2f} of "
              f"{dev.peak_flops / 1e12:.0f} TFLOP/s"]
    lines += ["", "verdict: " + v.message]
    return "\n".join(lines)


def to_json(r: dict) -> dict:
    c = r["census"]
    return {"model": {"params": c.total, "trainable": c.numel(trainable=True),
                      "experts": c.numel(trainable=True, expert=True), "layers": c.layers, "hidden": c.hidden,
                      "intermediate": c.intermediate, "vocab": c.vocab},
            "setup": dataclasses.asdict(r["setup"]), "memory": r["memory"].to_dict(),
            "memory_other_checkpointing": r["other_ckpt"].to_dict(), "time": r["time"].to_dict(),
            "verdict": dataclasses.asdict(r["verdict"]), "device": dataclasses.asdict(r["device"]),
            "ep_note": r["ep_note"]}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, ds, source, args, device = load(argv)
        r = plan(cfg, ds, source, args, device)
    except ValueError as exc:  # ConfigError included: every problem, named
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(r))
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(to_json(r), indent=1))
        print(f"wrote {args.out_json}")
    return 0 if r["verdict"].fits else 1


if __name__ == "__main__":
    sys.exit(main())
