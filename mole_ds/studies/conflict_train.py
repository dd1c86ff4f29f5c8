"""Train and score one arm of the conflict study in this process (a tiny frozen LLaMA plus LoRA or MoLE).

Algorithm of :func:`train_arm`:
  1. Base: a tiny ``LlamaForCausalLM`` built from a config with the seed's weights (frozen random; see
     docs/conflict_study.md for why it is not pretrained), the same for every arm of a seed.
  2. Patch it with ``mole_ds.patch_model``: plain LoRA is ``MoLEConfig(num_experts=1)`` (E = 1 equals LoRA);
     MoLE arms use the arm's routing mode. Arms that fix the expert per sample (``oracle`` by domain, or by a
     hash of the inputs) use ``routing='oracle'`` and hand the ids over with ``mole_ds.set_sample_domains``.
  3. Train with AdamW (warm-up, cosine decay) on batches whose domains are drawn per sample; the loss is the
     cross-entropy of the answer token only (predicted at SEP), plus ``mole_ds.aux_loss`` for MoLE.
  4. Score every trained domain on its held-out inputs: exact match (argmax = greedy decoding of the one
     answer token) and answer loss; and count routing per (layer, domain, expert) on those inputs, for all
     prompt tokens and for the SEP position alone (the token whose output is the answer).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mole_ds.config import MoLEConfig
from mole_ds.demo.conflict import ConflictTask
from mole_ds.models.tiny import build_tiny_llama
from mole_ds.mole.collect import aux_loss, routing_counts_by_sample
from mole_ds.patching import patch_model, set_prompt_mask, set_sample_domains
from mole_ds.routing_table import RoutingTable


ROUTE_BY = ("router", "domain", "input_hash")

MI = 0.1
"""mi_coef of the recipes that use the mutual-information objective."""
RECIPES: dict[str, dict] = {
    # name: MoLEConfig overrides (+ "router_lr_mult": the router's learning rate / the adapters'). Every recipe
    # keeps one expert per token; all keep the paper's balance loss beside the options they add.
    "st_mi": {"routing": "st", "mi_coef": MI},
    "st_sample": {"routing": "st", "routing_level": "sample"},
    "st_sample_mi": {"routing": "st", "routing_level": "sample", "mi_coef": MI},
    "sparse_sample_mi": {"routing": "sparse", "routing_level": "sample", "mi_coef": MI},
    "st_sample_mi_lr": {"routing": "st", "routing_level": "sample", "mi_coef": MI, "router_input_norm": True,
                        "router_lr_mult": 10.0},
    "st_sample_mi_noise": {"routing": "st", "routing_level": "sample", "mi_coef": MI, "router_noise": 1.0},
    "sparse_sample_mi_lr": {"routing": "sparse", "routing_level": "sample", "mi_coef": MI,
                            "router_input_norm": True, "router_lr_mult": 10.0},
    "sparse_sample_mi_center": {"routing": "sparse", "routing_level": "sample", "mi_coef": MI, "router_center": True},
    "st_sample_mi_center": {"routing": "st", "routing_level": "sample", "mi_coef": MI, "router_center": True},
    "sparse_sample_mi_center_lr": {"routing": "sparse", "routing_level": "sample", "mi_coef": MI,
                                   "router_center": True, "router_lr_mult": 10.0},
}
"""The v3 learned-routing arms (``mole_<name>``), see docs/conflict_study.md."""


@dataclass
class ArmRun:
    """One training run: which domains it trains on and how its adapter routes."""

    arm: str
    """Table row (``per_domain``, ``mix``, ``mole_st``, ...)."""
    train_domains: list[int]
    steps: int
    experts: int
    rank: int
    routing: str = "sparse"
    """MoLE routing mode (``oracle`` for the fixed-routing arms)."""
    route_by: str = "router"
    """'router' (the learned router), 'domain' (expert = domain mod E) or 'input_hash' (expert = sum of the
    input symbols mod E: a fixed split that ignores the domain)."""
    batch: int | None = None
    """Samples per step (None: the settings' batch)."""
    recipe: str | None = None
    """A :data:`RECIPES` entry: routing options of the v3 arms (its ``routing`` replaces ``routing``)."""


@dataclass
class TrainSettings:
    """The model and optimiser settings shared by every arm (a subset of ``ConflictConfig``)."""

    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    batch: int = 64
    lr: float = 1e-2
    warmup_frac: float = 0.05
    alpha_over_rank: float = 2.0
    dropout: float = 0.0
    attn_lora: bool = False
    balance_loss: str = "mole"
    balance_coef: float = 0.01
    top_k: int = 1
    base: str = "tiny"
    """'tiny' (frozen random tiny LLaMA, seeded) or 'smollm2' (pretrained, ``studies.pretrained_base``)."""
    base_layers: int = 0
    """smollm2: keep the first this many decoder layers (0 = all 30)."""


def build_base(task: ConflictTask, s: TrainSettings, seed: int) -> torch.nn.Module:
    """Step 1: the frozen random base of a seed (init scale 1/sqrt(hidden), so the frozen LM head can give
    the answer a clear margin once the adapter points the last hidden state at it). ``s.base == 'smollm2'``:
    the pretrained model (the same for every seed)."""
    if s.base == "smollm2":
        from .pretrained_base import load_pretrained

        return load_pretrained(s.base_layers)[0]
    return build_tiny_llama(seed=seed, vocab_size=task.vocab_size, hidden_size=s.hidden,
                            intermediate_size=s.intermediate, num_layers=s.layers, num_heads=s.heads,
                            num_kv_heads=max(1, s.heads // 2), initializer_range=1.0 / math.sqrt(s.hidden),
                            max_position_embeddings=16)


def fixed_expert_ids(run: ArmRun, task: ConflictTask, d_B: torch.Tensor, x_BS: torch.Tensor) -> torch.Tensor | None:
    """The per-sample expert ids of a fixed-routing arm (None for a learned router)."""
    if run.route_by == "domain":
        return d_B % run.experts
    if run.route_by == "input_hash":
        return x_BS.sum(1) % run.experts
    return None


def _forward_answer(model, task: ConflictTask, run: ArmRun, d_B, x_BS, ids_BL) -> torch.Tensor:
    ids = fixed_expert_ids(run, task, d_B, x_BS)
    if ids is not None:
        set_sample_domains(model, ids)
    if _sample_level(run):
        # The input is the prompt alone (the answer is predicted at SEP): sample routing pools all of it.
        set_prompt_mask(model, torch.ones_like(ids_BL, dtype=torch.bool))
    return model(input_ids=ids_BL).logits[:, -1].float()  # logits at SEP: the answer's


def _recipe(run: ArmRun) -> dict:
    if run.recipe is None:
        return {}
    if run.recipe not in RECIPES:
        raise ValueError(f"recipe ({run.recipe!r}) must be one of {', '.join(RECIPES)}")
    return RECIPES[run.recipe]


def _sample_level(run: ArmRun) -> bool:
    return _recipe(run).get("routing_level") == "sample"


def train_arm(task: ConflictTask, run: ArmRun, s: TrainSettings, seed: int) -> dict:
    """Steps 1-4 for one run; returns a JSON-ready record (see module docstring)."""
    if run.route_by not in ROUTE_BY:
        raise ValueError(f"route_by ({run.route_by!r}) must be one of {', '.join(ROUTE_BY)}")
    t0 = time.perf_counter()
    model = build_base(task, s, seed)
    torch.manual_seed(10_000 + seed)  # adapter init: the same per seed for every arm of that shape
    recipe = {k: v for k, v in _recipe(run).items() if k != "router_lr_mult"}
    cfg = MoLEConfig(**{**dict(num_experts=run.experts, top_k=min(s.top_k, run.experts), rank=run.rank,
                               alpha=s.alpha_over_rank * run.rank, dropout=s.dropout, routing=run.routing,
                               balance_loss=s.balance_loss, balance_coef=s.balance_coef, attn_lora=s.attn_lora,
                               backend="torch"), **recipe})
    report = patch_model(model, cfg)
    # The router's own learning rate (as train.router_lr does in the engine): a second group, same schedule.
    router = [p for n, p in model.named_parameters() if p.requires_grad and ".router." in n]
    others = [p for n, p in model.named_parameters() if p.requires_grad and ".router." not in n]
    mult = float(_recipe(run).get("router_lr_mult", 1.0))
    groups = [{"params": others, "lr": s.lr}] + ([{"params": router, "lr": s.lr * mult}] if router else [])
    opt = torch.optim.AdamW(groups, lr=s.lr, weight_decay=0.0)
    warm = max(1, int(s.warmup_frac * run.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, i / max(1, run.steps))))))
    gen = torch.Generator().manual_seed(20_000 + seed)
    use_aux = run.experts > 1 and run.route_by == "router" and (s.balance_loss != "none" or cfg.mi_coef > 0)
    model.train()
    losses = []
    for _ in range(run.steps):
        d_B, x_BS = task.sample(gen, run.batch or s.batch, run.train_domains)
        ids_BL, ans_B = task.encode(d_B, x_BS)
        loss = F.cross_entropy(_forward_answer(model, task, run, d_B, x_BS, ids_BL), ans_B)
        total = loss + aux_loss(model) if use_aux else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    rec = {"arm": run.arm, "seed": seed, "train_domains": list(run.train_domains), "steps": run.steps,
           "batch": run.batch or s.batch,
           "experts": run.experts, "rank": run.rank, "routing": cfg.routing, "route_by": run.route_by,
           **({"recipe": run.recipe, "mole": {k: getattr(cfg, k) for k in ("routing_level", "mi_coef",
              "router_temperature", "router_input_norm", "router_noise")}, "router_lr_mult": mult}
              if run.recipe else {}),
           "trainable_params": report.trainable_params, "train_s": round(train_s, 3),
           "first_train_loss": _mean(losses[:10]), "last_train_loss": _mean(losses[-10:]),
           **evaluate(model, task, run)}
    rec["wall_s"] = round(time.perf_counter() - t0, 3)
    return rec


def _mean(v: list[float]) -> float | None:
    return sum(v) / len(v) if v else None


@torch.no_grad()
def evaluate(model, task: ConflictTask, run: ArmRun) -> dict:
    """Step 4: per trained domain, exact match and answer loss on its held-out inputs; routing counts
    ``[layer][domain][expert]`` over all prompt tokens and over the SEP token alone (MoLE arms only; domains
    in ``run.train_domains`` order)."""
    model.eval()
    em, loss, all_LDE, sep_LDE = {}, {}, [], []
    for d in run.train_domains:
        x_MS, ids_ML, ans_M = task.eval_set(d)
        d_M = torch.full((x_MS.shape[0],), d, dtype=torch.long)
        logits = _forward_answer(model, task, run, d_M, x_MS, ids_ML)
        em[str(d)] = float((logits.argmax(-1) == ans_M).float().mean())
        loss[str(d)] = float(F.cross_entropy(logits, ans_M))
        if run.experts > 1:
            full_LE = routing_counts_by_sample(model).sum(1)
            if _sample_level(run):
                # Every token of a sample follows the sample's choice: the SEP token's counts are the
                # prompt's divided by its length (exact integers).
                sep_LE = torch.div(full_LE, ids_ML.shape[1], rounding_mode="floor")
            else:
                # A causal model routes position t the same in any prompt prefix longer than t, so the SEP
                # token's counts are (counts over the prompt) - (counts over the prompt without SEP).
                _forward_answer(model, task, run, d_M, x_MS, ids_ML[:, :-1])
                sep_LE = full_LE - routing_counts_by_sample(model).sum(1)
            all_LDE.append(full_LE)
            sep_LDE.append(sep_LE)
    out = {"em": em, "loss": loss, "eval_size": int(task.eval_inputs_MS.shape[0])}
    if all_LDE:
        names = [f"d{d}" for d in run.train_domains]
        # Counts are sums of one-hot choices: integers held exactly in fp32 at these sizes.
        for key, per_domain in (("routing_all", all_LDE), ("routing_sep", sep_LDE)):
            out[key] = RoutingTable(names, torch.stack(per_domain, 1).round().long().tolist()).to_dict()
    return out
