"""What ``launchers/train.py`` runs: parse, check everything, initialise distributed, train."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import check_against_deepspeed, check_values, load_run_config

USAGE = """deepspeed launchers/train.py --deepspeed ds_configs/zero3_ep.json [--config run.yaml] [--section.key value ...]

Sections: model, mole, data, train, checkpoint (see mole_ds/train/config.py and mole_ds/config.py).
The DeepSpeed file may carry run settings under a "mole_ds" key, e.g. {"mole_ds": {"mole": {"ep_size": 2}}};
the run config file overrides them and command-line overrides win over both.
Example: --mole.num_experts 8 --train.max_steps 50 --data.train demo_data/shards/manifest.json --checkpoint.resume auto
"""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="launchers/train.py", usage=USAGE)
    ap.add_argument("--deepspeed", "--deepspeed_config", dest="deepspeed", required=True, help="DeepSpeed JSON config")
    ap.add_argument("--config", default=None, help="run config (YAML or JSON)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    return ap.parse_known_args(argv)


def prepare(argv: list[str], world_size: int):
    """(run config, DeepSpeed config) after every check that needs no process group; raises ValueError."""
    from .engine import strip_ds_config

    args, overrides = parse_args(argv)
    ds_path = Path(args.deepspeed)
    if not ds_path.is_file():
        raise ValueError(f"--deepspeed ({args.deepspeed}) does not exist")
    try:
        ds_full = json.loads(ds_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--deepspeed ({args.deepspeed}) is not valid JSON: {exc}") from None
    ds, ours = strip_ds_config(ds_full)
    from .ds_schema import check_deepspeed_keys

    # A typo such as zero_optimisation would silently mean ZeRO-0. bf16.enabled "auto" is ours (resolved at
    # start-up, mole_ds.train.model_loading.resolve_precision): DeepSpeed's schema sees a boolean.
    bf = ds.get("bf16")
    schema_view = {**ds, "bf16": {**bf, "enabled": True}} if isinstance(bf, dict) and bf.get("enabled") == "auto" else ds
    problems = check_deepspeed_keys(schema_view)
    cfg = load_run_config(args.config, overrides, base=ours)
    problems += check_values(cfg) + check_against_deepspeed(cfg, ds, world_size)
    if problems:
        raise ValueError("invalid run configuration:\n  " + "\n  ".join(problems))
    return cfg, ds


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done (or stopped by SIGINT/SIGTERM at a step boundary with a final checkpoint),
    2 refused configuration, 1 any failure of this rank or a peer (see mole_ds.train.faults)."""
    argv = sys.argv[1:] if argv is None else argv
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg, ds = prepare(argv, world)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from .env import apply_launch_env

    apply_launch_env()  # the same defaults however the ranks were started (deepspeed, torchrun, srun, python)

    from datetime import timedelta

    import deepspeed
    import torch

    from .engine import check_deepspeed_version
    from .faults import describe_failure, exit_now, teardown
    from .loop import Trainer

    check_deepspeed_version()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # A peer that dies is noticed at once (its sockets close); one that hangs fails the collective here.
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    from .shm import release_own_shm_buffer

    release_own_shm_buffer()
    trainer = None
    try:
        trainer = Trainer(cfg, ds)
        summary = trainer.run()
        if trainer.rank == 0:
            print_summary(cfg, summary)
    except BaseException as exc:  # noqa: BLE001 - every failure ends this rank, nonzero, without hanging
        print(describe_failure(exc, rank), file=sys.stderr, flush=True)
        import traceback

        traceback.print_exc()
        teardown([trainer.close] if trainer is not None else [], destroy_group=False)
        exit_now(1)
    teardown([trainer.close])
    return 0


def print_summary(cfg, summary: dict) -> None:
    out = Path(cfg.train.output_dir)
    print("\n=== mole_ds run summary ===")
    print(f"steps {summary['steps']} ({summary['steps_this_run']} this run)  world {summary['world_size']}  "
          f"ZeRO-{summary['zero_stage']}  ep_size {summary['ep_size']}  median step {summary['median_step_s']:.3f}s"
          + ("  (stopped by a signal)" if summary.get("interrupted") else ""))
    print(f"{summary['patch']}")
    print(f"expert params per rank {summary['expert_param_bytes_per_rank']:,} B; other params per rank "
          f"{summary['other_param_bytes_per_rank']:,} B")
    for k, v in summary["eval"].items():
        print(f"eval {k}: {v:.4f}")
    from ..data import format_counts

    print(f"data (all ranks): {format_counts(summary['data_stats'])}")
    for w in summary.get("warnings", []):
        print(f"WARNING: {w}")
    print(f"checkpoint: {summary['checkpoint']}")
    if cfg.model.train_base:
        print(f"metrics: {out / 'metrics.jsonl'}  summary: {out / 'summary.json'}")
    else:
        print(f"tokens per expert (all layers): {[int(x) for x in summary['routing_tokens_per_expert']]}")
        print(f"metrics: {out / 'metrics.jsonl'}  routing: {out / 'routing.png'}  summary: {out / 'summary.json'}")
