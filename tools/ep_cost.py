#!/usr/bin/env python
"""The expert-placement cost model on paper: where does expert parallelism start to pay, and by how much?

    python tools/ep_cost.py                       # LLaVA-1.5-7B MoLE on 8 nodes x 8 GPUs, bf16, ZeRO-3
    python tools/ep_cost.py --link pcie_eth100 --tokens-per-rank 4096 --experts 8 64 512 --json out.json

For each expert count it prints every placement's expert-related communication per rank per optimizer step
(token all-to-all, ZeRO parameter/gradient traffic), the predicted time on the given link, memory per rank,
and the placement the model picks; the speed-up column is the replicated placement's communication time over
the best placement's. Nothing runs on a GPU: this is arithmetic over mole_ds.parallel.cost_model with
documented link figures (docs/scaling.md says where they come from).
"""
from __future__ import annotations

import argparse
import json
import sys

from mole_ds.parallel import cost_model as cm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128, 256, 512])
    ap.add_argument("--world", type=int, default=64)
    ap.add_argument("--ranks-per-node", type=int, default=8)
    ap.add_argument("--tokens-per-rank", type=int, nargs="+", default=[4096, 32768],
                    help="tokens per rank per micro-step (LLaVA-1.5 fine-tuning: 16 x ~2048 = 32768)")
    ap.add_argument("--micro-steps", type=int, default=1)
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--dtype-bytes", type=int, default=2)
    ap.add_argument("--link", default="h100_nvlink_ib400")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    link = cm.Link.preset(a.link)
    out = []
    for tokens in a.tokens_per_rank:
        print(f"\n== {tokens} tokens/rank/micro-step, world {a.world} ({a.ranks_per_node}/node), ZeRO-{a.stage}, "
              f"hidden {a.hidden}, intermediate {a.intermediate}, {a.layers} layers, rank {a.rank}, "
              f"{a.dtype_bytes}-byte weights, link {a.link} (alpha {link.alpha_s * 1e6:.0f} us, "
              f"{link.beta_Bps / 1e9:.0f} GB/s in node, {link.beta_inter_Bps / 1e9:.0f} GB/s across)")
        print(f"{'E':>4} {'best ep':>7} {'rep comm ms':>11} {'best comm ms':>12} {'speed-up':>8} "
              f"{'rep param MB':>12} {'best param MB':>13} {'optim MB':>9}")
        for E in a.experts:
            w = cm.Workload(tokens_per_rank=tokens, hidden=a.hidden, intermediate=a.intermediate, layers=a.layers,
                            rank=a.rank, num_experts=E, world_size=a.world, micro_steps=a.micro_steps,
                            zero_stage=a.stage, param_bytes=a.dtype_bytes,
                            optim_bytes_per_param=12 if a.dtype_bytes == 2 else 8, ranks_per_node=a.ranks_per_node)
            chosen, costs = cm.choose_ep_size(w, link)
            rep = next(c for c in costs if c.ep_size == 1)
            best = next(c for c in costs if c.ep_size == chosen)
            print(f"{E:>4} {chosen:>7} {rep.comm_s * 1e3:>11.2f} {best.comm_s * 1e3:>12.2f} "
                  f"{rep.comm_s / best.comm_s:>8.2f} {rep.expert_param_bytes_per_rank / 1e6:>12.1f} "
                  f"{best.expert_param_bytes_per_rank / 1e6:>13.1f} {best.expert_optim_bytes_per_rank / 1e6:>9.1f}")
            out.append({"tokens_per_rank": tokens, "num_experts": E, "chosen_ep_size": chosen,
                        "placements": [c.to_dict() for c in costs]})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "link": vars(link), "rows": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
