"""Many experts: sweep num_experts x ep_size x any other probe field over real DeepSpeed probe launches.

Each point is one probe launch (:func:`run_probe` -> ``mole_ds.train.sweep.run_point``) (``mole_ds/train/probe.py`` on ``world`` ranks: a
few real training steps of a tiny patched model on synthetic batches). The sweep is the product of the lists;
points that cannot exist (ep_size > world, world not divisible by ep_size, experts not divisible by ep_size,
top_k > experts) are listed as skipped. A failing point is recorded with its error and the sweep goes on.
Results are rewritten after every point, so an interrupted sweep resumes from its results file: points already
present (ok or failed) are skipped unless ``retry_failed``.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

# probe.py's options that a sweep may vary or fix (name -> type); experts / ep are the sweep's own axes.
PROBE_FIELDS = {"stage": int, "top_k": int, "rank": int, "hidden": int, "layers": int, "micro_batch": int,
                "seq": int, "steps": int, "warmup": int, "backend": str, "routing": str}

COLUMNS = ["experts", "ep_size", "world_size", "zero_stage", "top_k", "lora_rank", "step_s", "tokens_per_s",
           "peak_memory_bytes_per_rank", "expert_param_bytes_per_rank", "base_param_bytes_per_rank",
           "optimizer_state_bytes_per_rank", "all_to_all_bytes_per_step_per_rank", "load_max_over_mean",
           "routing_entropy", "routing_entropy_max", "experts_never_used", "error"]


def parse_field(spec: str) -> tuple[str, list]:
    """'top_k=1,2' -> ('top_k', [1, 2]); the name must be a probe field (see PROBE_FIELDS)."""
    name, eq, vals = spec.partition("=")
    name = name.strip().replace("-", "_")
    if not eq or not vals:
        raise ValueError(f"--field {spec!r}: expected NAME=V1,V2,...")
    if name not in PROBE_FIELDS:
        raise ValueError(f"--field {spec!r}: {name!r} is not a probe field; known: {', '.join(PROBE_FIELDS)}")
    tp = PROBE_FIELDS[name]
    try:
        return name, [tp(v) for v in vals.split(",") if v != ""]
    except ValueError:
        raise ValueError(f"--field {spec!r}: values must be {tp.__name__}") from None


@dataclass
class ScalingConfig:
    world: int = 2
    """Ranks per launch (CPU processes here; GPUs on a cluster)."""
    experts: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128])
    ep: list[int] = field(default_factory=lambda: [1, 2, 4])
    fields: dict[str, list] = field(default_factory=dict)
    """Extra swept probe fields, e.g. {"top_k": [1, 2]}."""
    fixed: dict = field(default_factory=lambda: {"stage": 3, "steps": 4, "warmup": 1, "seq": 64})
    """Probe fields held fixed for every point."""
    out: str = "scaling"
    """Results prefix: OUT.json, OUT.csv, OUT.png."""
    timeout: int = 900
    retry_failed: bool = False


def plan(cfg: ScalingConfig) -> tuple[list[dict], list[dict]]:
    """(points, skipped): each point is the probe args dict plus "world"; skipped ones carry a reason."""
    names = list(cfg.fields)
    points, skipped = [], []
    for E, ep, *vals in itertools.product(cfg.experts, cfg.ep, *[cfg.fields[n] for n in names]):
        args = {**cfg.fixed, "experts": E, "ep": ep, **dict(zip(names, vals))}
        why = None
        if ep > cfg.world:
            why = f"ep_size ({ep}) > world ({cfg.world})"
        elif cfg.world % ep:
            why = f"world ({cfg.world}) not divisible by ep_size ({ep})"
        elif E % ep:
            why = f"experts ({E}) not divisible by ep_size ({ep})"
        elif args.get("top_k", 1) > E:
            why = f"top_k ({args['top_k']}) > experts ({E})"
        (skipped if why else points).append({**args, "world": cfg.world, **({"skipped": why} if why else {})})
    return points, skipped


def point_key(point: dict) -> str:
    return json.dumps({k: v for k, v in sorted(point.items()) if k not in ("skipped",)}, sort_keys=True)


def load_results(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"rows": []}


def run_sweep(cfg: ScalingConfig, runner=None, log=print) -> dict:
    """Run every missing point (``runner(world, args)``, default run_point) and write the results after each."""
    if runner is None:
        runner = _probe_runner(cfg.timeout)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jpath = out.with_suffix(".json")
    res = load_results(jpath)
    rows = res["rows"]
    if cfg.retry_failed:
        rows = [r for r in rows if "error" not in r]
    done = {r["key"] for r in rows}
    points, skipped = plan(cfg)
    for s in skipped:
        log(f"skip {s['experts']:>4} experts ep {s['ep']}: {s['skipped']}")
    todo = [p for p in points if point_key(p) not in done]
    log(f"{len(points)} point(s), {len(points) - len(todo)} already in {jpath}, {len(todo)} to run "
        f"(world {cfg.world})")
    for i, p in enumerate(todo):
        args = {k: v for k, v in p.items() if k != "world"}
        rec = runner(cfg.world, args)
        row = {"key": point_key(p), "point": p, **rec}
        rows.append(row)
        if "error" in rec:
            log(f"[{i + 1}/{len(todo)}] experts {p['experts']:>4} ep {p['ep']}: FAILED {rec['error']}")
        else:
            log(f"[{i + 1}/{len(todo)}] experts {p['experts']:>4} ep {p['ep']} {_extra(p, cfg)}: "
                f"step {rec['step_s']:.3f}s, peak {rec['peak_memory_bytes_per_rank'] / 2**20:.0f} MiB/rank, "
                f"experts {rec['expert_param_bytes_per_rank']:,} B/rank")
        write_results(cfg, rows, skipped)
    return write_results(cfg, rows, skipped)


def run_probe(world: int, args: dict, timeout: int = 900) -> dict:
    """One probe launch (``mole_ds.train.sweep.run_point``) in the launch environment of every run
    (``mole_ds.train.env.launch_env``: one thread per rank, offline, a per-interpreter op cache)."""
    from ..train.env import launch_env
    from ..train.sweep import run_point

    return run_point(world, args, timeout=timeout, env=launch_env())


def _probe_runner(timeout: int):
    def runner(world: int, args: dict) -> dict:
        return run_probe(world, args, timeout=timeout)

    return runner


def _extra(p: dict, cfg: ScalingConfig) -> str:
    return " ".join(f"{n}={p[n]}" for n in cfg.fields)


def _sort_key(r: dict, cfg: ScalingConfig):
    p = r["point"]
    return tuple(str(p.get(n)) for n in cfg.fields) + (p["ep"], p["experts"])


def write_results(cfg: ScalingConfig, rows: list[dict], skipped: list[dict]) -> dict:
    """OUT.json (every row, the config, the skipped points), OUT.csv (COLUMNS + swept fields) and OUT.png."""
    out = Path(cfg.out)
    rows = sorted(rows, key=lambda r: _sort_key(r, cfg))
    res = {"config": asdict(cfg), "rows": rows, "skipped": skipped}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out.with_suffix(".json"))  # atomic: an interrupt never leaves a half-written results file
    cols = COLUMNS[:6] + [n for n in cfg.fields if n not in COLUMNS] + COLUMNS[6:]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([_cell(r, c) for c in cols])
    if any("error" not in r for r in rows):
        plot(cfg, rows, out.with_suffix(".png"))
    return res


def _cell(r: dict, c: str):
    p = r["point"]
    fallback = {"experts": p["experts"], "ep_size": p["ep"], "world_size": p["world"]}
    v = r.get(c, p.get(c, fallback.get(c, "")))
    return v


def plot(cfg: ScalingConfig, rows: list[dict], path: Path) -> None:
    """Step time, peak memory, expert / optimizer bytes per rank, all-to-all bytes and load vs experts (log2 x),
    one line per ep_size (and per value of every other swept field)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("step_s", "median step time (s)", 1), ("peak_memory_bytes_per_rank", "peak memory per rank (MiB)", 2**20),
              ("expert_param_bytes_per_rank", "expert param bytes per rank (KiB)", 2**10),
              ("optimizer_state_bytes_per_rank", "optimizer state bytes per rank (KiB)", 2**10),
              ("all_to_all_bytes_per_step_per_rank", "all-to-all bytes per step per rank (KiB)", 2**10),
              ("load_max_over_mean", "load max/mean (1 = balanced)", 1)]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    ok = [r for r in rows if "error" not in r]
    series: dict[tuple, list] = {}
    for r in ok:
        p = r["point"]
        series.setdefault((p["ep"],) + tuple(p.get(n) for n in cfg.fields), []).append(r)
    styles = ["-", "--", ":", "-."]
    for ax, (key, label, scale) in zip(axes.flat, panels):
        for i, (s, rs) in enumerate(sorted(series.items(), key=lambda kv: tuple(map(str, kv[0])))):
            rs = sorted(rs, key=lambda r: r["point"]["experts"])
            name = f"ep {s[0]}" + "".join(f", {n}={v}" for n, v in zip(cfg.fields, s[1:]))
            other = tuple(s[1:])
            ls = styles[sorted({tuple(k[1:]) for k in series}, key=str).index(other) % len(styles)]
            ax.plot([r["point"]["experts"] for r in rs], [r[key] / scale for r in rs], marker="o", ls=ls, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts per layer")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    st = cfg.fixed.get("stage", 3)
    fig.suptitle(f"MoLE scaling: world {cfg.world}, ZeRO-{st}, probe {cfg.fixed}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(cfg: ScalingConfig, rows: list[dict]) -> str:
    """A fixed-width table: one line per point."""
    extra = list(cfg.fields)
    hdr = (f"{'experts':>7} {'ep':>3} " + "".join(f"{n:>8} " for n in extra) +
           f"{'step s':>7} {'tok/s':>7} {'peak MiB':>8} {'expert KiB':>10} {'base KiB':>9} {'optim KiB':>9} "
           f"{'a2a KiB':>8} {'load':>5} {'H/Hmax':>6} {'unused':>6}")
    lines = [hdr]
    for r in sorted(rows, key=lambda r: _sort_key(r, cfg)):
        p = r["point"]
        head = f"{p['experts']:>7} {p['ep']:>3} " + "".join(f"{str(p.get(n)):>8} " for n in extra)
        if "error" in r:
            lines.append(head + f"FAILED: {r['error'][:80]}")
            continue
        hmax = r["routing_entropy_max"]
        lines.append(head + f"{r['step_s']:>7.3f} {r['tokens_per_s']:>7.0f} {r['peak_memory_bytes_per_rank'] / 2**20:>8.0f} "
                     f"{r['expert_param_bytes_per_rank'] / 1024:>10.1f} {r['base_param_bytes_per_rank'] / 1024:>9.1f} "
                     f"{r['optimizer_state_bytes_per_rank'] / 1024:>9.1f} "
                     f"{r['all_to_all_bytes_per_step_per_rank'] / 1024:>8.1f} {r['load_max_over_mean']:>5.2f} "
                     f"{(r['routing_entropy'] / hmax if hmax > 0 else 1.0):>6.2f} {r['experts_never_used']:>6}")
    return "\n".join(lines)


def finite_numbers(row: dict) -> bool:
    """Every numeric probe field of an ok row is finite (used by tests)."""
    return all(math.isfinite(row[c]) for c in COLUMNS if c != "error" and isinstance(row.get(c), (int, float)))
