#!/usr/bin/env python
"""Where should the experts live? Every placement measured on N CPU ranks, beside the cost model's prediction.

    python tools/bench_ep.py [--world 2] [--experts 4 16 64 256] [--stages 2 3] [--rounds 3] \
        [--json docs/results/bench_ep.json] [--png docs/results/bench_ep.png]

For each ZeRO stage and expert count, every placement (ep_size 1 = replicated, and each ep_size dividing the
world and E) is launched ``--rounds`` times, alternating the order, in one run (each launch: a few real
training steps of a tiny patched model, mole_ds/train/probe.py); the step time of a placement is the median
over rounds of each launch's median step. One more launch asks for ``ep_size auto`` and records what the cost
model chose from its own all-to-all calibration.

Per (stage, E, placement) it prints and writes: step_s_median, step_ratio_vs_replicated, all-to-all bytes
forward / backward per step per rank (to other ranks only), forward bytes per remote row per layer, ZeRO
collective bytes per step (DeepSpeed's comms logger), expert parameter and optimizer bytes per rank,
predicted_step_s, auto_choice. The prediction: the measured replicated step minus the model's expert
communication time for replicated plus the model's time for the placement (the model predicts differences
between placements; compute and the frozen base are common to all).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from mole_ds.train.sweep import run_point


def _point(world: int, stage: int, E: int, ep, a) -> dict:
    return run_point(world, {"experts": E, "ep": ep, "stage": stage, "steps": a.steps, "warmup": a.warmup,
                             "seq": a.seq, "micro_batch": a.micro_batch, "hidden": a.hidden, "layers": a.layers,
                             "rank": a.rank})


def measure_cell(world: int, stage: int, E: int, a, log=print) -> list[dict]:
    eps = [p for p in range(1, world + 1) if world % p == 0 and E % p == 0]
    runs: dict[int, list[dict]] = {p: [] for p in eps}
    for r in range(a.rounds):
        for p in (eps if r % 2 == 0 else eps[::-1]):  # alternate the order: both see the same drift
            res = _point(world, stage, E, p, a)
            if "error" in res:
                raise RuntimeError(f"ZeRO-{stage} E={E} ep_size={p}: {res['error']}")
            runs[p].append(res)
    auto = _point(world, stage, E, "auto", a)
    if "error" in auto:
        raise RuntimeError(f"ZeRO-{stage} E={E} ep_size=auto: {auto['error']}")
    choice = int(auto["ep_size"])
    pred = {int(k): v for k, v in auto["predicted_comm_s"].items()}
    rows = []
    med = {p: statistics.median(x["step_s"] for x in runs[p]) for p in eps}
    for p in eps:
        last = runs[p][-1]
        rows.append({
            "zero_stage": stage, "num_experts": E, "ep_size": p, "world_size": world,
            "tokens_per_rank": last["tokens_per_rank"], "hidden_size": last["hidden_size"], "layers": last["layers"],
            "lora_rank": last["lora_rank"], "step_s_median": med[p], "step_s_rounds": [x["step_s"] for x in runs[p]],
            "step_ratio_vs_replicated": med[p] / med[1],
            "a2a_bytes_fwd": last["a2a_bytes_fwd"], "a2a_bytes_bwd": last["a2a_bytes_bwd"],
            "a2a_fwd_bytes_per_remote_row_layer": last["a2a_fwd_bytes_per_remote_row_layer"],
            "zero_comm_msg_bytes_per_step": last["zero_comm_msg_bytes_per_step"],
            "expert_param_bytes_per_rank": last["expert_param_bytes_per_rank"],
            "expert_optim_bytes_per_rank": last["expert_optim_bytes_per_rank"],
            "predicted_comm_s": pred[p],
            "predicted_step_s": med[1] - pred[1] + pred[p],
            "auto_choice": choice,
            "link_alpha_s": auto["link_alpha_s"], "link_beta_Bps": auto["link_beta_Bps"],
        })
    fastest = min(rows, key=lambda r: r["step_s_median"])
    for r in rows:
        r["auto_within_10pct_of_fastest"] = med[choice] <= 1.10 * fastest["step_s_median"]
    return rows


HEADER = (f"{'ZeRO':>4} {'E':>4} {'ep':>3} {'step ms':>8} {'x rep':>6} {'pred ms':>8} {'a2a fwd KB':>11} "
          f"{'a2a bwd KB':>11} {'B/row/layer':>11} {'ZeRO KB':>9} {'exp param KB':>12} {'exp optim KB':>12} {'auto':>5}")


def format_row(r: dict) -> str:
    return (f"{r['zero_stage']:>4} {r['num_experts']:>4} {r['ep_size']:>3} {r['step_s_median'] * 1e3:>8.1f} "
            f"{r['step_ratio_vs_replicated']:>6.2f} {r['predicted_step_s'] * 1e3:>8.1f} "
            f"{r['a2a_bytes_fwd'] / 1e3:>11.1f} {r['a2a_bytes_bwd'] / 1e3:>11.1f} "
            f"{r['a2a_fwd_bytes_per_remote_row_layer']:>11.0f} {r['zero_comm_msg_bytes_per_step'] / 1e3:>9.1f} "
            f"{r['expert_param_bytes_per_rank'] / 1e3:>12.1f} {r['expert_optim_bytes_per_rank'] / 1e3:>12.1f} "
            f"{r['auto_choice'] if r['ep_size'] == r['auto_choice'] else '':>5}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = sorted({r["zero_stage"] for r in rows})
    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 4), squeeze=False)
    for ax, st in zip(axes[0], stages):
        sub = [r for r in rows if r["zero_stage"] == st]
        for ep in sorted({r["ep_size"] for r in sub}):
            pts = sorted((r["num_experts"], r["step_s_median"] * 1e3, r["predicted_step_s"] * 1e3)
                         for r in sub if r["ep_size"] == ep)
            xs = [p[0] for p in pts]
            line = ax.plot(xs, [p[1] for p in pts], "o-", label=f"ep_size {ep} measured")[0]
            ax.plot(xs, [p[2] for p in pts], "x--", color=line.get_color(), label=f"ep_size {ep} predicted")
        for E in sorted({r["num_experts"] for r in sub}):
            ch = next(r for r in sub if r["num_experts"] == E and r["ep_size"] == r["auto_choice"])
            ax.annotate("auto", (E, ch["step_s_median"] * 1e3), textcoords="offset points", xytext=(0, 8),
                        ha="center", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts per layer")
        ax.set_ylabel("median step (ms)")
        ax.set_title(f"ZeRO-{st}, world {sub[0]['world_size']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64, 256])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    a = ap.parse_args(argv)

    rows: list[dict] = []
    print(f"world {a.world}, {a.rounds} alternating rounds per placement, {a.micro_batch}x{a.seq} tokens/rank, "
          f"hidden {a.hidden}, {a.layers} layers, LoRA rank {a.rank}\n{HEADER}", flush=True)
    for stage in a.stages:
        for E in a.experts:
            cell = measure_cell(a.world, stage, E, a)
            rows.extend(cell)
            for r in cell:
                print(format_row(r), flush=True)
    ok = all(r["auto_within_10pct_of_fastest"] for r in rows)
    print(f"auto within 10% of the fastest measured placement in every cell: {ok}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    if a.png:
        plot(rows, Path(a.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
