"""What ``launchers/train.py`` runs: parse, check everything, initialise distributed, train.

Every refused configuration ends the same way, before or after the ranks start: one message listing every
problem, each naming its field and value (a :class:`mole_ds.config.ConfigError`), and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..config import ConfigError
from .config import check_against_deepspeed, check_data_fits, check_values, fields_help, load_run_config

USAGE = """deepspeed launchers/train.py --deepspeed ds_configs/zero3_ep.json [--config run.yaml] [--section.key value ...]

Sections: model, mole, data, train, checkpoint (see mole_ds/train/config.py and mole_ds/config.py).
The DeepSpeed file may carry run settings under a "mole_ds" key, e.g. {"mole_ds": {"mole": {"ep_size": 2}}};
the run config file overrides them and command-line overrides win over both.
Example: --mole.num_experts 8 --train.max_steps 50 --data.train demo_data/shards/manifest.json --checkpoint.resume auto
"""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="launchers/train.py", usage=USAGE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="run config fields (--section.key value; lists as a,b; mappings as "
                                        "a=0.5,b=0.5):\n\n" + fields_help())
    ap.add_argument("--deepspeed", "--deepspeed_config", dest="deepspeed", required=True, help="DeepSpeed JSON config")
    ap.add_argument("--config", default=None, help="run config (YAML or JSON)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    return ap.parse_known_args(argv)


def read_deepspeed_file(path: str) -> tuple[dict, dict]:
    """(DeepSpeed's part, the "mole_ds" part) of a DeepSpeed JSON file; ValueError naming the file when it is
    missing or not JSON. The one reader for the launcher and the planner."""
    from .engine import strip_ds_config

    ds_path = Path(path)
    if not ds_path.is_file():
        raise ValueError(f"--deepspeed ({path}) does not exist")
    try:
        ds_full = json.loads(ds_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--deepspeed ({path}) is not valid JSON: {exc}") from None
    return strip_ds_config(ds_full)


def prepare(argv: list[str], world_size: int):
    """(run config, DeepSpeed config) after every check that needs no process group (the processor's image-token
    count included: it is built here, without the model); raises ConfigError listing every problem."""
    args, overrides = parse_args(argv)
    ds, ours = read_deepspeed_file(args.deepspeed)
    from .ds_schema import check_deepspeed_keys

    # A typo such as zero_optimisation would silently mean ZeRO-0. bf16.enabled "auto" is ours (resolved at
    # start-up, mole_ds.train.model_loading.resolve_precision): DeepSpeed's schema sees a boolean.
    bf = ds.get("bf16")
    schema_view = {**ds, "bf16": {**bf, "enabled": True}} if isinstance(bf, dict) and bf.get("enabled") == "auto" else ds
    problems = check_deepspeed_keys(schema_view)
    try:
        cfg = load_run_config(args.config, overrides, base=ours)
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems) from None
    problems += check_values(cfg) + check_against_deepspeed(cfg, ds, world_size)
    if not any(x.startswith(("model.path", "data.")) for x in problems):
        # data.max_length against the processor's image-token expansion, before the model is loaded.
        from .model_loading import build_processor

        try:
            processor = build_processor(cfg.model)
        except (OSError, ValueError) as exc:
            problems.append(f"model.path ({cfg.model.path!r}) has no processor that loads: "
                            f"{' '.join(str(exc).split())[:500]}")
        else:
            problems += check_data_fits(cfg, processor)
    if problems:
        raise ConfigError(problems)
    return cfg, ds


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done (or stopped by SIGINT/SIGTERM at a step boundary with a final checkpoint),
    2 refused configuration, 1 any failure of this rank or a peer (see mole_ds.train.faults)."""
    argv = sys.argv[1:] if argv is None else argv
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg, ds = prepare(argv, world)
    except ValueError as exc:  # a ConfigError, or a file that cannot be read
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
    except ConfigError as exc:
        # Found only once the ranks run (e.g. the shards of a remote source): the same refusal, the same status.
        # Every rank finds it (the same config and data), so none waits on a peer.
        print(f"error: {exc}", file=sys.stderr, flush=True)
        teardown([trainer.close] if trainer is not None else [], destroy_group=False)
        exit_now(2)
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
