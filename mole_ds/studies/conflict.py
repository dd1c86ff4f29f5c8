"""The paper's domain-conflict experiment in miniature (LLaVA-MoLE, arXiv 2401.16160, Tables 1-2 in spirit).

Algorithm of :func:`run_study` (every step is skipped when its output already exists, so an interrupted
study resumes where it stopped):
  1. Data: draw the conflict set (``mole_ds.demo.conflict``: the same questions, a different answer convention
     per domain, the domain told apart by the image background) with held-out eval splits, plus a caption
     split for the base; shard every domain on its own (``shards/{split}/{domain}/manifest.json``).
  2. Base: train the embedded tiny LLaVA in full on the caption split (``--model.train_base true``), so the
     frozen base knows the words and the visual features but none of the answer conventions.
  3. Runs, each with every seed and the same LoRA rank, all over the frozen base (``--model.path``):
     ``lora_single`` (plain LoRA = MoLE with 1 expert, one run per domain on that domain only),
     ``lora_mix`` (plain LoRA on the mix, as many samples as the single runs together),
     ``lora_mix_2x`` (the same with twice the steps, i.e. twice the samples),
     ``mole_mix`` (MoLE, E experts, top-k, the ``lora_mix`` budget) and optionally ``lora_mix_r<R>`` (rank sweep).
  4. Score every run per held-out domain: answer exact match (greedy generation with the run's export) and the
     answer-token loss (the run's final eval ``loss/<domain>``); record cost (wall time, median step,
     trainable parameters) and, for MoLE runs, routing per layer x domain.
  5. Aggregate over seeds (mean and 95% t-interval), write ``results.json``, ``results.csv``, ``table.md``,
     ``em_bars.png`` and the seed-summed routing heatmap ``routing_mole/routing.png``.
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..demo.conflict import CONFLICT_DOMAINS, generate_conflict
from .runs import RunResult, ds_config, launch_train
from .stats import fmt_ci, mean_ci


@dataclass
class ConflictConfig:
    """Sizes and settings of the study (defaults: the ~1 h study on 2 CPU cores; :meth:`quick`: minutes)."""

    out: str = "runs/conflict_study"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    domains: list[str] = field(default_factory=lambda: list(CONFLICT_DOMAINS))
    train_per_domain: int = 400
    """Training samples per domain."""
    eval_per_domain: int = 60
    """Held-out samples per domain (drawn with a different seed)."""
    caption_train: int = 2400
    """Samples of the caption split the base is pretrained on."""
    base_steps: int = 2000
    base_lr: float = 3e-3
    steps_per_domain: int = 200
    """Optimizer steps of a single-domain run; mix runs take this x the number of domains (2x runs twice that)."""
    micro_batch: int = 8
    lr: float = 2e-3
    lora_rank: int = 8
    """The same rank for every run's LoRA / experts (alpha = 2 x rank)."""
    experts: int = 3
    top_k: int = 1
    routing: str = "sparse"
    balance_coef: float = 0.01
    rank_sweep: list[int] = field(default_factory=list)
    """Extra plain-LoRA mix runs at these ranks (empty: none)."""
    tiny_hidden: int = 64
    tiny_layers: int = 2
    max_length: int = 96
    world: int = 1
    """Ranks per run (1: ZeRO stage 0; >1: ZeRO-2 data parallel, ep_size 1)."""
    max_new_tokens: int = 6

    @classmethod
    def quick(cls, out: str) -> "ConflictConfig":
        """One seed, tiny sizes: checks the whole pipeline in a few minutes (numbers are meaningless)."""
        return cls(out=out, seeds=[0], train_per_domain=16, eval_per_domain=6, caption_train=32, base_steps=4,
                   steps_per_domain=2, micro_batch=4, max_new_tokens=3)


@dataclass
class RunSpec:
    name: str
    """Directory name, e.g. lora_colour, lora_mix, mole_mix."""
    group: str
    """Table row: lora_single, lora_mix, lora_mix_2x, mole_mix, lora_mix_r16."""
    train_domains: list[str]
    steps: int
    experts: int
    rank: int
    seed: int


def plan_runs(cfg: ConflictConfig) -> list[RunSpec]:
    """Step 3's runs (every seed)."""
    D, S = len(cfg.domains), cfg.steps_per_domain
    runs = []
    for seed in cfg.seeds:
        for d in cfg.domains:
            runs.append(RunSpec(f"lora_{d}", "lora_single", [d], S, 1, cfg.lora_rank, seed))
        runs.append(RunSpec("lora_mix", "lora_mix", list(cfg.domains), S * D, 1, cfg.lora_rank, seed))
        runs.append(RunSpec("lora_mix_2x", "lora_mix_2x", list(cfg.domains), 2 * S * D, 1, cfg.lora_rank, seed))
        runs.append(RunSpec("mole_mix", "mole_mix", list(cfg.domains), S * D, cfg.experts, cfg.lora_rank, seed))
        for r in cfg.rank_sweep:
            runs.append(RunSpec(f"lora_mix_r{r}", f"lora_mix_r{r}", list(cfg.domains), S * D, 1, r, seed))
    return runs


GROUP_ORDER = ("base", "lora_single", "lora_mix", "lora_mix_2x", "mole_mix")


# -- step 1 and 2 ----------------------------------------------------------------------------------------
def prepare_data(cfg: ConflictConfig, log=print) -> Path:
    """Generate and shard the data once; returns the data directory."""
    from ..data import DomainSource, ShardConfig, shard_dataset

    data = Path(cfg.out) / "data"
    done = data / "DONE"
    if done.is_file():
        return data
    splits = generate_conflict(data, cfg.train_per_domain, cfg.eval_per_domain, cfg.caption_train,
                               max(cfg.eval_per_domain, 8), seed=0, domains=tuple(cfg.domains))
    for split, domains in splits.items():
        for name, path in domains.items():
            shard_dataset(ShardConfig([DomainSource(name, str(path), str(path.parent / name / "images"))],
                                      str(data / "shards" / split / name), max_samples=64, shuffle_seed=0,
                                      progress=False))
    done.write_text(json.dumps(asdict(cfg)))
    log(f"data: {data}")
    return data


def manifest(data: Path, split: str, domain: str) -> str:
    return str(data / "shards" / split / domain / "manifest.json")


def _common_overrides(cfg: ConflictConfig, seed: int) -> dict:
    return {"model.tiny_hidden": cfg.tiny_hidden, "model.tiny_layers": cfg.tiny_layers,
            "data.max_length": cfg.max_length, "data.num_workers": 0, "data.shuffle_buffer": 64, "data.seed": seed,
            "train.seed": seed, "train.log_every": 10, "train.eval_every": 0, "checkpoint.every": 0,
            "checkpoint.keep": 1, "mole.ep_size": 1}


def _ds(cfg: ConflictConfig) -> dict:
    return ds_config(cfg.micro_batch, stage=0 if cfg.world == 1 else 2)


def train_base(cfg: ConflictConfig, data: Path, log=print) -> dict:
    """Step 2 (once): the pretrained base; returns {"path": <transformers dir>, "wall_s", "eval"}."""
    out = Path(cfg.out) / "base"
    rec_path = out / "base.json"
    if rec_path.is_file():
        return json.loads(rec_path.read_text())
    log(f"base: pretraining the tiny LLaVA in full for {cfg.base_steps} steps on the caption split")
    ov = {**_common_overrides(cfg, 0), "model.train_base": "true", "train.max_steps": cfg.base_steps,
          "train.lr": cfg.base_lr, "train.warmup_steps": max(1, cfg.base_steps // 10),
          "data.train": manifest(data, "pretrain", "caption"), "data.eval": manifest(data, "pretrain_eval", "caption")}
    res = launch_train(out, ov, _ds(cfg), world=cfg.world)
    if not res.ok:
        raise RuntimeError(f"base pretraining failed ({res.error}); log: {out / 'train.log'}")
    ckpt = res.checkpoint()
    rec = {"path": str((ckpt / "model").resolve()), "wall_s": round(res.wall_s, 1), "eval": res.eval,
           "first_loss": res.train_losses[0] if res.train_losses else None,
           "last_loss": res.train_losses[-1] if res.train_losses else None}
    rec_path.write_text(json.dumps(rec, indent=1))
    log(f"base: {rec['path']} (caption eval loss {res.eval.get('loss/all', float('nan')):.3f}, {res.wall_s:.0f}s)")
    return rec


# -- steps 3 and 4 ----------------------------------------------------------------------------------------
def _export_params(path: Path) -> int:
    from safetensors import safe_open

    n = 0
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            shape = f.get_slice(k).get_shape()
            n += math.prod(shape)
    return n


def _routing_counts(run_dir: Path, domains: list[str]) -> list | None:
    """[layer][domain][expert] token counts rebuilt from routing.json, domains in ``domains`` order (None if
    absent)."""
    p = run_dir / "routing.json"
    if not p.is_file():
        return None
    r = json.loads(p.read_text())
    return [[[layer[d]["tokens"] * f for f in layer[d]["fraction"]] for d in domains] for layer in r["layers"]]


def specialisation(counts_DE: list[list[float]]) -> float:
    """Mutual information between domain and expert over tokens, / log(min(D, E)): 0 = routing ignores the
    domain, 1 = each domain has its own expert(s)."""
    D, E = len(counts_DE), len(counts_DE[0])
    tot = sum(map(sum, counts_DE))
    if tot <= 0 or min(D, E) < 2:
        return float("nan")
    pd = [sum(row) / tot for row in counts_DE]
    pe = [sum(counts_DE[d][e] for d in range(D)) / tot for e in range(E)]
    mi = 0.0
    for d in range(D):
        for e in range(E):
            p = counts_DE[d][e] / tot
            if p > 0:
                mi += p * math.log(p / (pd[d] * pe[e]))
    return mi / math.log(min(D, E))


def run_one(cfg: ConflictConfig, spec: RunSpec, data: Path, base: str, log=print) -> dict:
    """Train one run, score it, write and return its result record (cached in result.json)."""
    out = Path(cfg.out) / "runs" / spec.name / f"seed{spec.seed}"
    rec_path = out / "result.json"
    if rec_path.is_file():
        return json.loads(rec_path.read_text())
    ov = {**_common_overrides(cfg, spec.seed), "model.path": base, "mole.num_experts": spec.experts,
          "mole.top_k": min(cfg.top_k, spec.experts), "mole.rank": spec.rank, "mole.alpha": 2 * spec.rank,
          "mole.routing": cfg.routing, "mole.balance_coef": cfg.balance_coef, "train.max_steps": spec.steps,
          "train.lr": cfg.lr, "train.warmup_steps": max(1, spec.steps // 10),
          "data.train": [manifest(data, "train", d) for d in spec.train_domains],
          "data.eval": [manifest(data, "eval", d) for d in spec.train_domains]}
    t0 = time.perf_counter()
    res: RunResult = launch_train(out, ov, _ds(cfg), world=cfg.world)
    rec = {**asdict(spec), "ok": res.ok, "error": res.error, "wall_s": round(res.wall_s, 2),
           "median_step_s": res.summary.get("median_step_s"), "loss": {}, "em": {}, "examples": {},
           "trainable_params": None, "routing_counts": None, "first_train_loss": None, "last_train_loss": None}
    if res.ok:
        ckpt = res.checkpoint()
        export = ckpt / "mole.safetensors"
        rec["trainable_params"] = _export_params(export)
        rec["loss"] = {d: res.eval.get(f"loss/{d}") for d in spec.train_domains}
        rec["first_train_loss"] = res.train_losses[0] if res.train_losses else None
        rec["last_train_loss"] = res.train_losses[-1] if res.train_losses else None
        rec["routing_counts"] = _routing_counts(out, spec.train_domains) if spec.experts > 1 else None
        from .answers import exact_match_file, load_run_model

        model, processor = load_run_model(base, export)
        for d in spec.train_domains:
            em = exact_match_file(model, processor, data / "raw" / "eval" / f"{d}.json",
                                  max_new_tokens=cfg.max_new_tokens)
            rec["em"][d], rec["examples"][d] = em["em"], em["examples"]
        rec["eval_wall_s"] = round(time.perf_counter() - t0 - res.wall_s, 2)
        # Keep the run small on disk: the DeepSpeed optimizer states are not needed once the export is read.
        for f in ckpt.glob("*optim_states.pt"):
            f.unlink()
    rec_path.write_text(json.dumps(rec, indent=1))
    status = "ok" if res.ok else f"FAILED: {res.error}"
    em_s = " ".join(f"{d}={v:.2f}" for d, v in rec["em"].items())
    log(f"  {spec.name:<14} seed {spec.seed} {spec.steps:>4} steps {res.wall_s:6.1f}s  EM {em_s}  {status}")
    return rec


def score_base(cfg: ConflictConfig, data: Path, base: str) -> dict:
    """Exact match of the frozen base itself (no tuning) per domain: the floor every run starts from."""
    p = Path(cfg.out) / "base" / "base_em.json"
    if p.is_file():
        return json.loads(p.read_text())
    from .answers import exact_match_file, load_run_model

    model, processor = load_run_model(base, None)
    rec = {"em": {}, "examples": {}}
    cap = exact_match_file(model, processor, data / "raw" / "pretrain_eval" / "caption.json", max_new_tokens=10)
    rec["caption_em"], rec["caption_examples"] = cap["em"], cap["examples"]
    for d in cfg.domains:
        em = exact_match_file(model, processor, data / "raw" / "eval" / f"{d}.json", max_new_tokens=cfg.max_new_tokens)
        rec["em"][d], rec["examples"][d] = em["em"], em["examples"]
    p.write_text(json.dumps(rec, indent=1))
    return rec


# -- step 5 -------------------------------------------------------------------------------------------------
def aggregate(cfg: ConflictConfig, records: list[dict], base_em: dict) -> dict:
    """Per group x domain: EM and loss mean / 95% half-width / n; per group: cost; MoLE routing summary."""
    groups = [g for g in GROUP_ORDER if g == "base" or any(r["group"] == g for r in records)]
    groups += sorted({r["group"] for r in records} - set(groups))
    table, cost = [], []
    for g in groups:
        for d in cfg.domains + ["mean"]:
            if g == "base":
                v = base_em["em"].get(d) if d != "mean" else sum(base_em["em"].values()) / len(base_em["em"])
                table.append({"group": g, "domain": d, "em_mean": v, "em_ci95": float("nan"), "em_n": 1,
                              "loss_mean": float("nan"), "loss_ci95": float("nan"), "loss_n": 0})
                continue
            recs = [r for r in records if r["group"] == g and r["ok"]]
            if d == "mean":  # per seed, the mean over domains, then mean and interval over seeds
                by_seed: dict[int, list] = {}
                for r in recs:
                    by_seed.setdefault(r["seed"], []).append(r)
                em_vals = [sum(v for r in rs for v in r["em"].values()) / len(cfg.domains) for rs in by_seed.values()
                           if sum(len(r["em"]) for r in rs) == len(cfg.domains)]
                loss_vals = [sum(v for r in rs for v in r["loss"].values() if v is not None) / len(cfg.domains)
                             for rs in by_seed.values() if sum(len(r["loss"]) for r in rs) == len(cfg.domains)]
            else:
                em_vals = [r["em"][d] for r in recs if d in r["em"]]
                loss_vals = [r["loss"][d] for r in recs if r["loss"].get(d) is not None]
            em_m, em_h, em_n = mean_ci(em_vals)
            lo_m, lo_h, lo_n = mean_ci(loss_vals)
            table.append({"group": g, "domain": d, "em_mean": em_m, "em_ci95": em_h, "em_n": em_n,
                          "loss_mean": lo_m, "loss_ci95": lo_h, "loss_n": lo_n})
        if g == "base":
            continue
        recs = [r for r in records if r["group"] == g]
        ok = [r for r in recs if r["ok"]]
        spec = [mean_ci([specialisation(lay) for lay in r["routing_counts"]])[0] for r in ok if r["routing_counts"]]
        cost.append({"group": g, "runs": len(recs), "failed": len(recs) - len(ok),
                     "steps_per_run": sorted({r["steps"] for r in recs}),
                     "trainable_params": max((r["trainable_params"] or 0) for r in ok) if ok else None,
                     "wall_s_per_seed": sum(r["wall_s"] for r in recs) / max(1, len(cfg.seeds)),
                     "median_step_s": mean_ci([r["median_step_s"] for r in ok if r["median_step_s"]])[0],
                     "routing_specialisation": mean_ci(spec) if spec else None})
    return {"table": table, "cost": cost, "errors": [{k: r[k] for k in ("name", "seed", "error")}
                                                     for r in records if not r["ok"]]}


def write_outputs(cfg: ConflictConfig, agg: dict, records: list[dict]) -> dict[str, Path]:
    out = Path(cfg.out)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "table.md",
             "png": out / "em_bars.png"}
    paths["json"].write_text(json.dumps({"config": asdict(cfg), **agg, "runs": records}, indent=1, default=str))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(agg["table"][0]))
        w.writeheader()
        w.writerows(agg["table"])
    paths["md"].write_text(format_table(agg))
    plot_bars(agg, cfg.domains, paths["png"])
    routing = aggregate_routing(cfg, records)
    if routing is not None:
        paths["routing"] = routing
    return paths


def format_table(agg: dict) -> str:
    """Markdown: one row per run group, EM (mean ± 95% CI) and answer loss per domain; then the cost table."""
    domains = [r["domain"] for r in agg["table"] if r["group"] == agg["table"][0]["group"]]
    lines = ["| run | " + " | ".join(f"EM {d}" for d in domains) + " | " + " | ".join(
        f"loss {d}" for d in domains if d != "mean") + " |",
        "|---" * (2 * len(domains)) + "|"]
    groups = list(dict.fromkeys(r["group"] for r in agg["table"]))
    for g in groups:
        rows = {r["domain"]: r for r in agg["table"] if r["group"] == g}
        em = [fmt_ci(rows[d]["em_mean"], rows[d]["em_ci95"], 2) for d in domains]
        lo = [fmt_ci(rows[d]["loss_mean"], rows[d]["loss_ci95"], 3) for d in domains if d != "mean"]
        lines.append(f"| {g} | " + " | ".join(em) + " | " + " | ".join(lo) + " |")
    lines += ["", "| run | runs | failed | steps | trainable params | wall s per seed (all runs of the row) | "
              "median step s | routing specialisation (MI/log min(D,E)) |", "|---" * 8 + "|"]
    for c in agg["cost"]:
        spec = "" if not c["routing_specialisation"] else fmt_ci(*c["routing_specialisation"][:2], 2)
        lines.append(f"| {c['group']} | {c['runs']} | {c['failed']} | {','.join(map(str, c['steps_per_run']))} | "
                     f"{c['trainable_params'] or 0:,} | {c['wall_s_per_seed']:.0f} | "
                     f"{c['median_step_s']:.3f} | {spec} |")
    return "\n".join(lines) + "\n"


def plot_bars(agg: dict, domains: list[str], path: Path) -> None:
    """Grouped bars: EM per domain (and the mean) per run group, 95% intervals as error bars; loss beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r["group"] for r in agg["table"]))
    cols = domains + ["mean"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(groups)
    for metric, ax, title in (("em", axes[0], "answer exact match (held out)"),
                              ("loss", axes[1], "answer-token loss (held out)")):
        for i, g in enumerate(groups):
            rows = {r["domain"]: r for r in agg["table"] if r["group"] == g}
            ys = [rows[d][f"{metric}_mean"] for d in cols]
            errs = [0 if not math.isfinite(rows[d][f"{metric}_ci95"]) else rows[d][f"{metric}_ci95"] for d in cols]
            if all(not math.isfinite(y) for y in ys):
                continue
            xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(cols))]
            ax.bar(xs, [y if math.isfinite(y) else 0 for y in ys], width, yerr=errs, capsize=2, label=g,
                   color=f"C{i}")  # one colour per run group in both panels
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(cols)
        ax.set_title(title, fontsize=10)
    axes[0].set_ylim(0, 1.05)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def aggregate_routing(cfg: ConflictConfig, records: list[dict]) -> Path | None:
    """Routing heatmap of all MoLE runs, token counts summed over seeds (expert ids are not aligned across
    seeds, so read per-seed heatmaps for specialisation; this one shows the overall balance)."""
    import torch

    from ..train.metrics import write_routing_report

    counts = [torch.tensor(r["routing_counts"], dtype=torch.float64) for r in records
              if r["ok"] and r.get("routing_counts") and r["group"] == "mole_mix"]
    if not counts:
        return None
    total = torch.stack(counts).sum(0)
    write_routing_report(total, list(cfg.domains), Path(cfg.out) / "routing_mole",
                         title=f"MoLE routing, {len(counts)} seed(s) summed ({cfg.experts} experts, top-{cfg.top_k})")
    return Path(cfg.out) / "routing_mole" / "routing.png"


def run_study(cfg: ConflictConfig, log=print) -> dict:
    """Steps 1-5; returns {"agg", "paths", "records", "wall_s"}."""
    t0 = time.perf_counter()
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, log)
    base = train_base(cfg, data, log)
    base_em = score_base(cfg, data, base["path"])
    log(f"base EM (no tuning): caption={base_em['caption_em']:.2f} "
        + " ".join(f"{d}={v:.2f}" for d, v in base_em["em"].items()))
    runs = plan_runs(cfg)
    log(f"{len(runs)} runs ({len(cfg.seeds)} seed(s)):")
    records = [run_one(cfg, spec, data, base["path"], log) for spec in runs]
    agg = aggregate(cfg, records, base_em)
    agg["base"] = {**base, "caption_em": base_em["caption_em"], "caption_examples": base_em["caption_examples"]}
    paths = write_outputs(cfg, agg, records)
    wall = time.perf_counter() - t0
    (Path(cfg.out) / "study_wall_s.txt").write_text(f"{wall:.1f}\n")
    return {"agg": agg, "paths": paths, "records": records, "wall_s": wall}
