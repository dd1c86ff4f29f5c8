"""Where should the LoRA experts live? Bytes, calls, time and memory per rank per optimizer step, per placement.

Placements of E experts on W ranks (ZeRO stage 2 or 3 for everything else):

* ``ep_size 1`` (replicated): every rank runs every expert; ZeRO moves the expert *parameters*:
  - ZeRO-3, tensors above the persistence threshold: gathered for forward and again for backward every
    micro-step over all W ranks, gradients reduce-scattered every micro-step;
  - ZeRO-3 persistent tensors (numel <= stage3_param_persistence_threshold) and ZeRO-2: gradients
    reduce-scattered every micro-step, the updated parameters all-gathered once per step.
* ``ep_size P`` (P | W, P | E): rank i of an expert-parallel group owns E/P experts; ZeRO moves their
  parameters only inside the expert-data-parallel group of W/P ranks (nothing when P = W), and the *tokens*
  move instead: per layer and micro-step one all-to-all of hidden-size rows to the owners and one back
  (forward), the same two for the gradients (backward), plus a tiny all-to-all of row counts. Under uniform
  routing a fraction (P-1)/P of a rank's T*J rows leave it.

Time = calls * alpha + bytes / beta for the link the traffic crosses; ``calibrate`` measures alpha and beta
on the running process group (so ``mole.ep_size: auto`` decides from this machine's fabric, not from habit);
``Link.preset`` gives documented figures for paper extrapolation. Compute and the frozen base's traffic are
the same in every placement and cancel out of the choice; the model predicts the *difference* between
placements, and ``tools/bench_ep.py`` checks it against measured step times.

Memory per rank (expert tensors only): optimizer states are E's worth / W in every placement (ZeRO already
partitions them); EP shrinks the ZeRO-2 parameter copy (E/P experts instead of E), ZeRO-3 persistent copies and
the ZeRO-3 per-layer gather buffer.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

PROJ_SHAPES = ("gate_A", "gate_B", "up_A", "up_B", "down_A", "down_B")


@dataclass
class Workload:
    """What one rank does per optimizer step (all counts per rank)."""

    tokens_per_rank: int
    """Tokens one rank routes per micro-step (micro-batch x sequence, pad included)."""
    hidden: int
    intermediate: int
    layers: int
    rank: int
    """LoRA rank r."""
    num_experts: int
    world_size: int
    top_k: int = 1
    dense: bool = False
    """Dense routing dispatches every token to all E experts."""
    weighted_rows: bool = False
    """Routing modes with a delta weight (weighted, st) send one extra column per row."""
    micro_steps: int = 1
    """Gradient accumulation steps per optimizer step."""
    zero_stage: int = 3
    param_bytes: int = 4
    """2 for bf16, 4 for fp32 (activations and gradients use the same)."""
    optim_bytes_per_param: int = 8
    """Adam: two fp32 moments (8) plus the fp32 master partition (4) that DeepSpeed's ZeRO optimizers keep at any
    stage >= 1, fp32 training included (tools/bench_ep.py measures 12); 8 only for plain fp32 Adam (stage 0)."""
    persistence_threshold: int = 100_000
    """ZeRO-3 stage3_param_persistence_threshold (DeepSpeed's default 1e5)."""
    ranks_per_node: int = 0
    """0 = all ranks on one node."""

    def tensor_numels(self, experts: int) -> dict[str, int]:
        D, F, r = self.hidden, self.intermediate, self.rank
        per = {"gate_A": r * D, "gate_B": F * r, "up_A": r * D, "up_B": F * r, "down_A": r * F, "down_B": D * r}
        return {k: experts * v for k, v in per.items()}

    @property
    def rows_per_token(self) -> int:
        return self.num_experts if self.dense else self.top_k


@dataclass
class Link:
    """Cost of one collective on a process group: alpha seconds + bytes per rank / beta."""

    alpha_s: float
    beta_Bps: float
    """Bytes per second one rank moves within a node."""
    beta_inter_Bps: float | None = None
    """... across nodes (None = same as within)."""
    source: str = "preset"

    @classmethod
    def preset(cls, name: str) -> "Link":
        """Documented figures (per GPU, effective for collectives, not peak): see docs/scaling.md."""
        presets = {
            # H100 SXM, NVLink 4 (~450 GB/s/direction peak; ~150 GB/s effective for all-to-all / all-gather of
            # MB-sized messages) and 8x400 Gb/s InfiniBand NDR per node (one 50 GB/s NIC per GPU, ~40 effective).
            "h100_nvlink_ib400": cls(alpha_s=25e-6, beta_Bps=150e9, beta_inter_Bps=40e9, source="preset"),
            # A100, NVLink 3 + 200 Gb/s HDR per GPU.
            "a100_nvlink_ib200": cls(alpha_s=30e-6, beta_Bps=100e9, beta_inter_Bps=20e9, source="preset"),
            # Commodity: 8 GPUs on PCIe + one 100 Gb/s Ethernet per node shared by 8 GPUs.
            "pcie_eth100": cls(alpha_s=50e-6, beta_Bps=20e9, beta_inter_Bps=1.5e9, source="preset"),
        }
        if name not in presets:
            raise ValueError(f"link preset ({name!r}) must be one of {', '.join(presets)}")
        return presets[name]


@dataclass
class PlacementCost:
    """Per rank, per optimizer step, expert-related only."""

    ep_size: int
    a2a_bytes_fwd: float = 0.0
    a2a_bytes_bwd: float = 0.0
    a2a_calls: int = 0
    param_gather_bytes: float = 0.0
    grad_reduce_bytes: float = 0.0
    gather_calls: int = 0
    expert_param_bytes_per_rank: float = 0.0
    expert_grad_bytes_per_rank: float = 0.0
    expert_optim_bytes_per_rank: float = 0.0
    gather_buffer_bytes: float = 0.0
    """ZeRO-3: the largest transient full copy of one layer's (local) experts during forward/backward."""
    comm_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _spans_nodes(group_size: int, strided: bool, w: Workload) -> bool:
    if not w.ranks_per_node or w.ranks_per_node >= w.world_size:
        return False
    # Expert-parallel groups are consecutive ranks; expert-data-parallel groups are strided by ep_size.
    return True if strided else group_size > w.ranks_per_node


def collective_time(calls: int, bytes_: float, link: Link, inter: bool) -> float:
    """calls x alpha + bytes / beta (the inter-node beta when ``inter`` and the link has one)."""
    if bytes_ <= 0:
        return calls * link.alpha_s
    beta = link.beta_inter_Bps if (inter and link.beta_inter_Bps) else link.beta_Bps
    return calls * link.alpha_s + bytes_ / beta


def placement_cost(w: Workload, ep_size: int, link: Link) -> PlacementCost:
    """Bytes, calls, time and memory per rank per optimizer step for ``ep_size`` (1 = replicated)."""
    P, W, m = ep_size, w.world_size, w.micro_steps
    edp = W // P  # ranks sharing (and partitioning) the same experts
    share = (edp - 1) / edp
    b = w.param_bytes
    c = PlacementCost(ep_size=P)
    numels = w.tensor_numels(w.num_experts // P)
    layer_numel = sum(numels.values())
    total = w.layers * layer_numel
    inter_edp = _spans_nodes(edp, strided=P > 1, w=w) if edp > 1 else False

    if w.zero_stage == 3:
        persistent = sum(n for n in numels.values() if n <= w.persistence_threshold) * w.layers
        partitioned = total - persistent
        # Partitioned tensors: one coalesced gather per layer for forward, one for backward, per micro-step.
        c.param_gather_bytes = m * 2 * partitioned * b * share + persistent * b * share  # persistent: after step
        c.gather_calls = (m * 2 * w.layers if partitioned and edp > 1 else 0)
        c.grad_reduce_bytes = m * total * b * share
        c.expert_param_bytes_per_rank = partitioned * b / edp + persistent * b
        c.gather_buffer_bytes = layer_numel * b if partitioned else 0.0
        if persistent:
            c.notes.append(f"{persistent:,} expert elements persistent (<= {w.persistence_threshold:,} per tensor)")
    else:
        c.param_gather_bytes = total * b * share  # updated partitions all-gathered once per step
        c.grad_reduce_bytes = m * total * b * share
        c.expert_param_bytes_per_rank = total * b
    c.expert_grad_bytes_per_rank = total * b / edp
    c.expert_optim_bytes_per_rank = total * w.optim_bytes_per_param / edp

    t_zero = collective_time(c.gather_calls, c.param_gather_bytes + c.grad_reduce_bytes, link, inter_edp)
    t_a2a = 0.0
    if P > 1:
        rows = w.tokens_per_rank * w.rows_per_token * (P - 1) / P  # rows that leave this rank, per layer
        width_out = w.hidden + (1 if w.weighted_rows else 0)
        per_layer_fwd = rows * (width_out + w.hidden) * b  # rows out + outputs back
        c.a2a_bytes_fwd = m * w.layers * per_layer_fwd
        c.a2a_bytes_bwd = m * w.layers * per_layer_fwd  # the gradients take the same routes back
        c.a2a_calls = m * w.layers * 5  # 2 forward + 2 backward row all-to-alls + 1 count exchange
        inter_ep = _spans_nodes(P, strided=False, w=w)
        t_a2a = collective_time(c.a2a_calls, c.a2a_bytes_fwd + c.a2a_bytes_bwd, link, inter_ep)
    c.comm_s = t_zero + t_a2a
    return c


def candidate_ep_sizes(num_experts: int, world_size: int) -> list[int]:
    return [p for p in range(1, world_size + 1) if world_size % p == 0 and num_experts % p == 0]


def choose_ep_size(w: Workload, link: Link, allowed: list[int] | None = None) -> tuple[int, list[PlacementCost]]:
    """The placement with the least predicted expert communication time (ties: less memory per rank), among
    ``allowed`` ep_sizes when given (e.g. those whose memory fits: mole_ds.parallel.memory_model.fitting_ep_sizes;
    none allowed: all are considered). ``costs`` lists every candidate either way."""
    costs = [placement_cost(w, p, link) for p in candidate_ep_sizes(w.num_experts, w.world_size)]
    pool = [c for c in costs if allowed is None or c.ep_size in allowed] or costs
    best = min(pool, key=lambda c: (round(c.comm_s, 9), c.expert_param_bytes_per_rank, c.ep_size))
    return best.ep_size, costs


def format_table(w: Workload, costs: list[PlacementCost], chosen: int, link: Link) -> str:
    lines = [f"expert placement (E={w.num_experts}, world {w.world_size}, ZeRO-{w.zero_stage}, "
             f"{w.tokens_per_rank} tokens/rank x {w.micro_steps} micro-steps, hidden {w.hidden}, "
             f"intermediate {w.intermediate}, rank {w.rank}, {w.layers} layers; link alpha "
             f"{link.alpha_s * 1e6:.0f} us, beta {link.beta_Bps / 1e9:.2f} GB/s, {link.source})",
             f"{'ep':>4} {'a2a MB/step':>12} {'ZeRO MB/step':>13} {'calls':>6} {'comm ms':>9} "
             f"{'param MB':>9} {'optim MB':>9}"]
    for c in costs:
        mark = "  <- chosen" if c.ep_size == chosen else ""
        lines.append(f"{c.ep_size:>4} {(c.a2a_bytes_fwd + c.a2a_bytes_bwd) / 1e6:>12.2f} "
                     f"{(c.param_gather_bytes + c.grad_reduce_bytes) / 1e6:>13.2f} "
                     f"{c.a2a_calls + c.gather_calls:>6} {c.comm_s * 1e3:>9.3f} "
                     f"{c.expert_param_bytes_per_rank / 1e6:>9.2f} {c.expert_optim_bytes_per_rank / 1e6:>9.2f}{mark}")
    return "\n".join(lines)


def calibrate(group=None, small: int = 256, large: int = 4 << 20, reps: int = 9) -> Link:
    """Measure alpha and beta of an all-to-all on ``group`` (every rank must call it).

    The two message sizes alternate (a transient stall on a shared machine hits both, not one), each timed
    ``reps`` times after a barrier; per size the median over repetitions, then the mean over ranks (one
    all-reduce, so every rank decides the same). alpha = the small message's time; beta = the large message's
    extra bytes over its extra time. A measurement where the large message was not slower than the small one is
    not a link figure: it is repeated (up to three times) and then refused with both times named."""
    import torch
    import torch.distributed as dist

    n = dist.get_world_size(group)
    if n == 1:  # nothing to measure, nothing is ever sent
        return Link(alpha_s=0.0, beta_Bps=float("inf"), source="one rank: no communication")
    bufs = {}
    for size in (small, large):
        per = max(size // 4 // n, 1)
        x = torch.zeros(per * n, dtype=torch.float32)
        bufs[size] = (x, torch.empty_like(x))
        dist.all_to_all_single(bufs[size][1], x, group=group)  # warm-up (connections, buffers)
    moved = large * (n - 1) / n
    for _attempt in range(3):
        ts: dict[int, list[float]] = {small: [], large: []}
        for _ in range(reps):
            for size in (small, large):
                dist.barrier(group=group)
                t0 = time.perf_counter()
                dist.all_to_all_single(bufs[size][1], bufs[size][0], group=group)
                ts[size].append(time.perf_counter() - t0)
        med = torch.tensor([sorted(v)[len(v) // 2] for v in (ts[small], ts[large])], dtype=torch.float64)
        dist.all_reduce(med, group=group)
        alpha, t_large = (float(v) / n for v in med)
        if t_large > alpha:
            return Link(alpha_s=alpha, beta_Bps=moved / (t_large - alpha),
                        source="measured all-to-all on this process group")
    raise RuntimeError(f"all-to-all calibration failed: a {large:,}-byte message took {t_large * 1e3:.3f} ms, "
                       f"no longer than a {small}-byte one ({alpha * 1e3:.3f} ms), three times: the machine is "
                       "too loaded to measure; set mole.ep_size explicitly")


def workload_from(model_dims: dict, mole, ds: dict, world_size: int, seq_len: int) -> Workload:
    """A :class:`Workload` from the model's sizes, the MoLE config, the DeepSpeed config and a sequence length."""
    zero = ds.get("zero_optimization", {})
    bf16 = bool(ds.get("bf16", {}).get("enabled"))
    return Workload(
        tokens_per_rank=int(ds.get("train_micro_batch_size_per_gpu", 1)) * seq_len,
        hidden=model_dims["hidden"], intermediate=model_dims["intermediate"], layers=model_dims["layers"],
        rank=mole.rank, num_experts=mole.num_experts, world_size=world_size, top_k=mole.top_k,
        dense=mole.routing == "dense", weighted_rows=mole.routing in ("weighted", "st"),
        micro_steps=int(ds.get("gradient_accumulation_steps", 1)), zero_stage=int(zero.get("stage", 0)),
        param_bytes=2 if bf16 else 4, optim_bytes_per_param=12 if bf16 or int(zero.get("stage", 0)) >= 1 else 8,
        persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 100_000)))


def model_dims(model) -> dict:
    """hidden / intermediate / layers of a (patched or not) transformers LLaMA or LLaVA model."""
    cfg = getattr(model.config, "text_config", None) or model.config
    return {"hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size, "layers": cfg.num_hidden_layers}


def bytes_per_row_layer(hidden: int, dtype_bytes: int) -> int:
    """The minimum a2a bytes per remote (token, expert) row per layer in forward: hidden out + hidden back."""
    return 2 * hidden * dtype_bytes


__all__ = ["Workload", "Link", "PlacementCost", "placement_cost", "collective_time", "choose_ep_size", "candidate_ep_sizes",
           "format_table", "calibrate", "workload_from", "model_dims", "bytes_per_row_layer"]
