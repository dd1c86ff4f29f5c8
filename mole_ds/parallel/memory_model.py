"""How much memory does one rank need, and how long does a step take? The planner's arithmetic.

Everything is counted from a model built on the meta device from its ``config.json`` alone (no weights read,
no memory used: :func:`census`), patched with MoLE exactly as training patches it, so every tensor's size,
dtype, trainability and ZeRO-3 persistence is the real one. Sizes per rank, ``b`` = bytes of the training
dtype (2 bf16, 4 fp32), W = world size, P = ep_size, T = micro-batch x max_length tokens:

Held between steps (``static``):

* **frozen base parameters**: ZeRO-3: ceil(numel / W) x b per tensor, or numel x b for a persistent tensor
  (numel <= ``stage3_param_persistence_threshold``); ZeRO 0-2: numel x b.
* **trainable parameters** (LoRA, routers, experts, projector): the same, except that a rank holds only E/P
  experts and ZeRO-3 partitions them over the expert-data-parallel group of W/P ranks.
* **gradients**: ZeRO-2/3: the rank's partition (trainable numel / W, experts E/P over W/P) x b; ZeRO 0-1: the
  full trainable numel x b.
* **optimizer state**: 12 bytes per trainable parameter of the partition (fp32 master + two fp32 Adam
  moments; DeepSpeed's ZeRO optimizers keep the master copy at every stage >= 1, fp32 training included:
  measured by tools/bench_ep.py); stage 0: 8 (torch AdamW's two moments; the weights are the master).

Transient, at the peak of forward + backward (``transient``; the peak is the start of the backward, when every
saved activation is alive and the loss's gradient is formed):

* **ZeRO-3 gathers**: full copies of the non-persistent tensors of the modules in flight. DeepSpeed keeps a
  gathered module whose next use lies within ``stage3_max_reuse_distance`` elements of the parameter trace
  (default 1e9); a module's next use after its forward is in the backward, 2 x (elements of the modules after
  it) away, so the trailing modules with 2 x suffix < reuse distance stay gathered through the turn from
  forward to backward; plus the prefetch bucket (``stage3_prefetch_bucket_size``, 5e7) and the largest single
  module. bytes = b x min(traced elements, retained + prefetch + largest).
* **gradient bucket** (ZeRO-2/3 ``reduce_bucket_size``, default 5e8 elements): GPU: allocated whole, b x size;
  CPU: only the pages written count, b x min(size, trainable elements on the rank).
* **activations** per decoder layer and token, as autograd saves them for this code (transformers' Llama
  layer with SDPA, LoRALinear attention, MoLEMLP; counted from the saved tensors by tests/unit/test_plan.py):

  ``A_layer = 8h + 8                              two RMSNorms keep their input in fp32 + rsqrt
            + (d ? 4 (m + b) h : b h)             LoRA inputs of q/k/v/o (each its own dropout mask + output)
            + 4 b r                               the rank-r intermediates of the 4 attention LoRAs
            + b (2h + 2 h_kv) + 4 a               SDPA (flash / memory-efficient): q, k, v, out + fp32 lse
            + 4h + 8E + 16 + 8k                   router input in fp32, probabilities, balance-loss terms
            + J x [ (d ? (m + b) : b) h           each routed row (J = top_k, E when dense): its input,
                    + 3 b I                       gate output, act(gate), up output,
                    + (d ? (m + b) : b) I         the down projection's input (+ dropout mask),
                    + 3 b r + 16 ]                the experts' rank-r intermediates, row indices
            + (J - 1) (2 b h + 4)                 top-k > 1: weighted combine of J rows``

  h hidden, I intermediate, r LoRA rank, E experts, a heads, h_kv = h x kv_heads / heads; d = LoRA dropout
  > 0; m = bytes of a dropout mask (CPU: the activation dtype, b; CUDA: 1, a bool mask). The Korthikanti et al.
  (2022) figure for a fully trained layer is 34 b/2 x h; here frozen projections save nothing for their own
  weight gradient, the norms keep fp32 copies, and the MoLE rows add the MLP-width terms. With fused attention
  the s x s score term (5 a s / h in Korthikanti's 16-bit count) is absent: both CPU SDPA and CUDA flash
  attention save only the log-sum-exp.
* **logits and loss**: transformers upcasts the logits to fp32 for the loss; at the start of the backward
  the b-byte logits, the fp32 log-softmax output and two fp32 gradients of it are alive: (b + 12) x vocab
  per token (16 x vocab in fp32, where the upcast is free); plus the final norm's fp32 input, 4h + 4.
* **with activation checkpointing** (every decoder layer): each layer keeps its input, b x h per token, and
  one layer at a time is recomputed during the backward, so the peak is
  L x b h T + max(logits and loss, one layer's A_layer x T + its backward working set 3 b I J T).

``peak = static + transient + runtime`` (runtime: the process itself, the CUDA context or, on CPU, Python,
torch and DeepSpeed after imports), times the device's allocator factor.

Step time per micro-step and rank (``plan_time``), FLOPs counted per token:

* frozen matmuls: 2 N (forward) + 2 N (backward to the activations only, no weight gradient) = 4 N, N = the
  LLM's frozen matmul parameters on the token path (decoder projections + lm_head; embeddings are lookups);
* trained matmuls: 6 n for the active LoRA/expert parameters of a token (its J experts' LoRA, the attention
  LoRA, the router);
* attention: 2 s h per layer forward (causal: half of 4 s h), x 3 with the backward;
* the vision tower (frozen, forward only) once per image: 2 N_vision x image tokens;
* with checkpointing the decoder layers' forward runs twice: + (2 N_layers + 2 n + 2 s h L) per token.
  compute time = FLOPs / (peak FLOP/s x MFU); communication: the cost model's expert traffic
  (:mod:`mole_ds.parallel.cost_model`: token all-to-alls or ZeRO traffic of the experts) plus ZeRO-3's gathers
  of the rest (each traced, non-retained element gathered for forward and again for backward, (W-1)/W of it
  over the link) and the gradient reduce-scatter of the non-expert trainable tensors. ZeRO-3 prefetch overlaps
  the gathers with compute, the token all-to-all does not:
  ``step = max(compute, ZeRO traffic) + all-to-all`` (``step_serial_s`` adds them all).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field

from ..config import MoLEConfig
from . import cost_model as cm

GiB = 1 << 30
MiB = 1 << 20


# -- devices ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Device:
    """A GPU (or this CPU) and its fabric, for the planner. Figures are public specs or measurements here."""

    name: str
    kind: str
    """'cuda' or 'cpu' (dropout masks: bool on CUDA, the activation dtype on CPU; gradient bucket)."""
    peak_flops: float
    """Dense bf16 matmul FLOP/s per device."""
    mfu: float
    """Fraction of peak_flops a training step achieves (an assumption, stated in docs/scaling.md)."""
    memory_bytes: int | None
    """Device memory (None: host memory, no budget)."""
    runtime_bytes: int
    """Memory the process holds before the model: CUDA context + NCCL buffers, or on CPU the resident set after
    imports and process-group set-up."""
    alloc_factor: float
    """Live tensor bytes -> memory the allocator holds (fragmentation, cached blocks)."""
    link: str
    """A :meth:`mole_ds.parallel.cost_model.Link.preset` name."""
    ranks_per_node: int
    source: str

    def link_figures(self) -> cm.Link:
        return cm.Link.preset(self.link)


PRESETS: dict[str, Device] = {
    # NVIDIA H100 SXM5 80GB datasheet: 989 TFLOP/s dense BF16 (1,979 with sparsity), 80 GB HBM3.
    "h100-nvlink-ib": Device("h100-nvlink-ib", "cuda", 989e12, 0.40, 80 * GiB, int(1.5 * GiB), 1.10,
                             "h100_nvlink_ib400", 8,
                             "H100 SXM5 datasheet (989 TFLOP/s dense bf16, 80 GB); NVLink 4 + 400 Gb/s IB per GPU"),
    # NVIDIA H200 SXM datasheet: the same compute as H100, 141 GB HBM3e.
    "h200-nvlink-ib": Device("h200-nvlink-ib", "cuda", 989e12, 0.40, 141 * 10**9, int(1.5 * GiB), 1.10,
                             "h100_nvlink_ib400", 8,
                             "H200 SXM datasheet (989 TFLOP/s dense bf16, 141 GB); NVLink 4 + 400 Gb/s IB per GPU"),
    # NVIDIA A100 SXM4 80GB datasheet: 312 TFLOP/s dense BF16, 80 GB HBM2e.
    "a100-nvlink-ib": Device("a100-nvlink-ib", "cuda", 312e12, 0.40, 80 * GiB, int(1.5 * GiB), 1.10,
                             "a100_nvlink_ib200", 8,
                             "A100 SXM4 80GB datasheet (312 TFLOP/s dense bf16); NVLink 3 + 200 Gb/s IB per GPU"),
    # This machine: 2 CPU ranks over gloo, 1 thread each (tools/bench_plan.py, docs/scaling.md). FLOP/s: a bf16
    # matmul at the stand-ins' MLP shape, 1 thread (208 GFLOP/s); MFU 0.33: measured step / predicted at MFU 1 on
    # the 254M stand-in (the 457M one then predicts within 6%). Runtime: resident set after imports + gloo
    # (381 MiB) + the stack's own memory above it in a step of the tiny model (183 MiB, with the CPU matmul caches
    # bounded by mole_ds.runtime.bound_cpu_kernel_caches). No allocator factor: with freed memory returned to the
    # system the resident set follows the live tensors (docs/scaling.md).
    "cpu-gloo-here": Device("cpu-gloo-here", "cpu", 208e9, 0.33, None, 564 * MiB, 1.0, "pcie_eth100", 0,
                            "measured on this 2-core VM (tools/bench_plan.py); link figures: use calibrate()"),
}


def preset(name: str) -> Device:
    if name not in PRESETS:
        raise ValueError(f"--preset ({name!r}) must be one of {', '.join(PRESETS)}")
    return PRESETS[name]


# -- the model on the meta device -------------------------------------------------------------------------------

@dataclass
class Tensor:
    name: str
    numel: int
    trainable: bool
    expert: bool
    module: str


@dataclass
class Census:
    """Every tensor of the MoLE-patched model (all E experts) and the model's dimensions."""

    tensors: list[Tensor]
    modules: list[tuple[str, int, bool]]
    """Modules with parameters of their own, in forward order: (name, elements, needs a backward fetch)."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    vision_params: int
    """Frozen vision tower parameters (0 without one)."""
    image_tokens: int
    """Tokens one image becomes in the LLM's sequence (0 without a vision tower)."""
    mole: MoLEConfig | None
    decoder_matmul_params: int
    """Frozen matmul elements of the decoder layers (q/k/v/o, gate/up/down)."""
    lm_head_params: int

    @property
    def total(self) -> int:
        return sum(t.numel for t in self.tensors)

    def numel(self, *, trainable: bool | None = None, expert: bool | None = None) -> int:
        return sum(t.numel for t in self.tensors
                   if (trainable is None or t.trainable == trainable) and (expert is None or t.expert == expert))


def meta_model(config):
    """The transformers model of ``config`` (a config object, or a dict / path to a config.json) on the meta
    device: every tensor has its shape and dtype and no storage."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlavaForConditionalGeneration

    if isinstance(config, (str, bytes)) or hasattr(config, "__fspath__"):
        from pathlib import Path

        p = Path(config)
        config = AutoConfig.from_pretrained(str(p.parent if p.name == "config.json" else p), local_files_only=True)
    elif isinstance(config, dict):
        d = dict(config)
        config = AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        if config.model_type == "llava":
            return LlavaForConditionalGeneration(config)
        return AutoModelForCausalLM.from_config(config)


def census(config, mole: MoLEConfig | None) -> Census:
    """Build the model on the meta device, patch MoLE (all E experts; ``mole`` None: the bare base) and count."""
    import torch

    from ..mole.experts import is_expert_name
    from ..patching import find_language_model, patch_model

    model = meta_model(config)
    lm = find_language_model(model)
    if mole is not None:
        with torch.random.fork_rng():  # A's initialisation draws from the global generator; leave it as it was
            patch_model(model, mole)
    tensors = [Tensor(n, p.numel(), p.requires_grad, is_expert_name(n), n.rsplit(".", 1)[0])
               for n, p in model.named_parameters()]
    cfg = model.config
    tcfg = getattr(cfg, "text_config", None) or cfg
    vision = getattr(model, "model", model)
    tower = getattr(vision, "vision_tower", None)
    vision_params = sum(p.numel() for p in tower.parameters()) if tower is not None else 0
    image_tokens = 0
    if tower is not None:
        v = cfg.vision_config
        image_tokens = (v.image_size // v.patch_size) ** 2 + (
            1 if getattr(cfg, "vision_feature_select_strategy", "default") == "full" else 0)
    # Forward order of the modules on the text path (a text-only batch never runs the vision tower).
    lm_prefix = next(n for n, m in model.named_modules() if m is lm)
    text_modules = []
    trainable_seen = False
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if not own or not (name.startswith(lm_prefix + ".") or name == "lm_head"):
            continue
        trainable_seen = trainable_seen or any(p.requires_grad for p in own)
        # A module before the first trained tensor (the embedding) is never fetched by the backward.
        text_modules.append((name, sum(p.numel() for p in own), trainable_seen or ".layers." in name))
    lm_head = getattr(model, "lm_head", None)
    layers = lm.layers
    dec = 0
    for layer in layers:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            dec += getattr(layer.self_attn, proj).weight.numel()
        for proj in ("gate_proj", "up_proj", "down_proj"):
            dec += getattr(layer.mlp, proj).weight.numel()
    return Census(tensors=tensors, modules=text_modules, hidden=tcfg.hidden_size,
                  intermediate=tcfg.intermediate_size, layers=tcfg.num_hidden_layers,
                  heads=tcfg.num_attention_heads,
                  kv_heads=getattr(tcfg, "num_key_value_heads", None) or tcfg.num_attention_heads,
                  vocab=tcfg.vocab_size, vision_params=vision_params, image_tokens=image_tokens, mole=mole,
                  decoder_matmul_params=dec, lm_head_params=lm_head.weight.numel() if lm_head is not None else 0)


# -- the run ---------------------------------------------------------------------------------------------------

@dataclass
class Setup:
    """What the run does, per rank: everything the DeepSpeed and run configs say that memory depends on."""

    world_size: int
    micro_batch: int
    seq_len: int
    """data.max_length (pad included: an upper bound)."""
    dtype_bytes: int = 2
    zero_stage: int = 3
    ep_size: int = 1
    grad_accum: int = 1
    checkpointing: bool = False
    images_per_sample: int = 0
    """Images per sample (each becomes ``image_tokens`` of the sequence and one vision-tower forward)."""
    persistence_threshold: int = 100_000
    prefetch_bucket: int = 50_000_000
    max_reuse_distance: int = 1_000_000_000
    reduce_bucket: int = 500_000_000

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


def setup_from(ds: dict, mole: MoLEConfig | None, world_size: int, seq_len: int, checkpointing: bool = False,
               images_per_sample: int = 0, micro_batch: int | None = None) -> Setup:
    """A :class:`Setup` from a DeepSpeed config (``bf16.enabled`` already resolved to a bool)."""
    zero = ds.get("zero_optimization", {}) or {}

    def num(key: str, default: int) -> int:
        v = zero.get(key, default)
        return default if v == "auto" else int(float(v))

    ep = 1 if mole is None or not isinstance(mole.ep_size, int) else mole.ep_size
    return Setup(world_size=world_size, micro_batch=int(micro_batch or ds.get("train_micro_batch_size_per_gpu", 1)),
                 seq_len=seq_len, dtype_bytes=2 if (ds.get("bf16") or {}).get("enabled") is True else 4,
                 zero_stage=int(zero.get("stage", 0)), ep_size=ep, grad_accum=int(ds.get("gradient_accumulation_steps", 1)),
                 checkpointing=checkpointing, images_per_sample=images_per_sample,
                 persistence_threshold=num("stage3_param_persistence_threshold", 100_000),
                 prefetch_bucket=num("stage3_prefetch_bucket_size", 50_000_000),
                 max_reuse_distance=num("stage3_max_reuse_distance", 1_000_000_000),
                 reduce_bucket=num("reduce_bucket_size", 500_000_000))


def problems(c: Census, s: Setup) -> list[str]:
    """Every reason the placement cannot run at all, each naming the field and value."""
    p = []
    from ..config import check_ep_size

    p += check_ep_size(s.ep_size, s.world_size)
    if c.mole is not None and c.mole.num_experts % s.ep_size:
        p.append(f"mole.num_experts ({c.mole.num_experts}) must be divisible by mole.ep_size ({s.ep_size})")
    if s.zero_stage not in (0, 1, 2, 3):
        p.append(f"zero_optimization.stage ({s.zero_stage}) must be 0, 1, 2 or 3")
    for name in ("micro_batch", "seq_len", "world_size"):
        if getattr(s, name) < 1:
            p.append(f"{name} ({getattr(s, name)}) must be >= 1")
    return p


# -- memory ----------------------------------------------------------------------------------------------------

@dataclass
class Memory:
    """Bytes per rank, by term (see the module docstring for each formula)."""

    base_params: float = 0.0
    mole_params: float = 0.0
    """Trainable tensors: LoRA experts, routers, attention LoRA (and the projector when trained)."""
    expert_params: float = 0.0
    """The experts' share of mole_params."""
    base_grads: float = 0.0
    mole_grads: float = 0.0
    base_optim: float = 0.0
    mole_optim: float = 0.0
    zero3_gathers: float = 0.0
    grad_bucket: float = 0.0
    activations: float = 0.0
    """Saved activations of the decoder layers (with checkpointing: their inputs) + final norm."""
    working: float = 0.0
    """The largest transient on top of them: logits + loss gradients, or one recomputed layer."""
    activations_no_ckpt: float = 0.0
    activations_ckpt: float = 0.0
    """activations + working, without and with checkpointing (both shown whatever the run uses)."""
    runtime: float = 0.0
    alloc_factor: float = 1.0
    notes: list[str] = field(default_factory=list)

    @property
    def static(self) -> float:
        return (self.base_params + self.mole_params + self.base_grads + self.mole_grads + self.base_optim
                + self.mole_optim)

    @property
    def transient(self) -> float:
        return self.zero3_gathers + self.grad_bucket + self.activations + self.working

    @property
    def model_peak(self) -> float:
        """static + transient: the tensors of this rank at the peak of a step."""
        return self.static + self.transient

    @property
    def peak(self) -> float:
        """What the device must hold: (static + transient) x allocator factor + runtime."""
        return self.model_peak * self.alloc_factor + self.runtime

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(static=self.static, transient=self.transient, model_peak=self.model_peak, peak=self.peak)
        return d


def layer_activation_bytes(c: Census, s: Setup, dev: Device) -> float:
    """A_layer: bytes autograd saves per token for one MoLE decoder layer (formula in the module docstring)."""
    h, I, b = c.hidden, c.intermediate, s.dtype_bytes
    mole = c.mole
    r = mole.rank if mole else 0
    E = mole.num_experts if mole else 0
    k = mole.top_k if mole else 1
    J = (E if mole and mole.routing == "dense" else k) if mole else 1
    d = bool(mole and mole.dropout > 0)
    m = b if dev.kind == "cpu" else 1
    h_kv = h * c.kv_heads // c.heads
    attn_lora = bool(mole and mole.attn_lora)
    a = 8 * h + 8                                             # two RMSNorms: fp32 input + rsqrt
    if attn_lora:
        a += (4 * (m + b) * h) if d else b * h                # q/k/v/o LoRA inputs (dropout: mask + output each)
        a += 4 * b * r                                        # rank-r intermediates
    a += b * (2 * h + 2 * h_kv) + 4 * c.heads                 # SDPA: q, k, v, out, fp32 log-sum-exp
    if mole is None:
        return a + 3 * b * I + b * I                          # plain frozen MLP: gate, act, up, down input
    a += 4 * h + 8 * E + 16 + 8 * k                           # router: fp32 input, probabilities, balance terms
    row = ((m + b) if d else b) * h + 3 * b * I + ((m + b) if d else b) * I + 3 * b * r + 16
    a += J * row + (J - 1) * (2 * b * h + 4)
    return a


def _zero3_gathers(c: Census, s: Setup, persistent: set[str], b: int) -> tuple[float, str]:
    # Non-persistent elements of each module, in forward order; the expert share scales with E/P.
    own = {}
    for t in c.tensors:
        if t.name in persistent:
            continue
        n = t.numel // s.ep_size if t.expert else t.numel
        own[t.module] = own.get(t.module, 0) + n
    seq = [(name, own.get(name, 0)) for name, _e, back in c.modules if back]
    total = sum(n for _, n in seq)
    retained, suffix = 0, 0
    for _name, n in reversed(seq):  # trailing modules: next use within the reuse distance
        if 2 * suffix < s.max_reuse_distance:
            retained += n
        suffix += n
    largest = max((n for _, n in seq), default=0)
    held = min(total, retained + s.prefetch_bucket + largest)
    return held * b, (f"ZeRO-3 gathers: {retained / 1e6:.0f}M elements kept from forward to backward (reuse "
                      f"distance {s.max_reuse_distance:.0e}) + prefetch {s.prefetch_bucket:.0e} + largest module "
                      f"{largest / 1e6:.0f}M, of {total / 1e6:.0f}M traced")


def plan_memory(c: Census, s: Setup, dev: Device) -> Memory:
    """Bytes per rank for ``s`` on ``dev`` (formulas: module docstring)."""
    b, W, P = s.dtype_bytes, s.world_size, s.ep_size
    edp = W // P
    mem = Memory(runtime=dev.runtime_bytes, alloc_factor=dev.alloc_factor)
    persistent: set[str] = set()
    optim_per = 12 if s.zero_stage >= 1 else 8
    trainable_on_rank = 0
    for t in c.tensors:
        n = t.numel // P if t.expert else t.numel            # elements this rank's model holds
        group = edp if t.expert else W                        # ranks that partition it
        if s.zero_stage == 3:
            if n <= s.persistence_threshold:
                persistent.add(t.name)
                held = n
            else:
                held = math.ceil(n / group)
        else:
            held = n
        if not t.trainable:
            mem.base_params += held * b
            continue
        trainable_on_rank += n
        part = math.ceil(n / group) if s.zero_stage >= 1 else n
        mem.mole_params += held * b
        if t.expert:
            mem.expert_params += held * b
        mem.mole_grads += (part if s.zero_stage >= 2 else n) * b
        mem.mole_optim += part * optim_per
    if s.zero_stage == 3:
        mem.zero3_gathers, note = _zero3_gathers(c, s, persistent, b)
        mem.notes.append(note)
    if s.zero_stage >= 2:
        mem.grad_bucket = (s.reduce_bucket if dev.kind == "cuda" else min(s.reduce_bucket, trainable_on_rank)) * b
    T = s.tokens
    A = layer_activation_bytes(c, s, dev)
    final = (4 * c.hidden + 4) * T                            # final norm: fp32 input + rsqrt
    logits = (b + 12) * c.vocab * T                           # b-byte logits, fp32 log-softmax out + 2 grads
    mole = c.mole
    J = 1 if mole is None else (mole.num_experts if mole.routing == "dense" else mole.top_k)
    layer_bwd = 3 * b * c.intermediate * J * T               # a layer's backward: gradients of g, u, act(g)
    no_ckpt = c.layers * A * T + final + max(logits, layer_bwd)
    ckpt_saved = c.layers * b * c.hidden * T + final
    ckpt = ckpt_saved + max(logits, A * T + layer_bwd)
    mem.activations_no_ckpt, mem.activations_ckpt = no_ckpt, ckpt
    if s.checkpointing:
        mem.activations, mem.working = ckpt_saved, max(logits, A * T + layer_bwd)
    else:
        mem.activations, mem.working = c.layers * A * T + final, max(logits, layer_bwd)
    return mem


# -- time ------------------------------------------------------------------------------------------------------

@dataclass
class Time:
    """Seconds per optimizer step per rank, by term; FLOPs per micro-step."""

    flops: float
    compute_s: float
    zero_s: float
    """ZeRO traffic of the non-expert tensors (base gathers, LoRA gradient reduce-scatters)."""
    expert_comm_s: float
    """The cost model's expert traffic (ZeRO of the experts, or token all-to-alls): the a2a part is serial."""
    a2a_s: float
    step_s: float
    step_serial_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def plan_time(c: Census, s: Setup, dev: Device, link: cm.Link | None = None) -> Time:
    """Predicted step time (FLOP accounting and overlap rule: module docstring)."""
    link = link or dev.link_figures()
    mole = c.mole
    T = s.tokens
    h, L = c.hidden, c.layers
    n_decoder = c.decoder_matmul_params
    active_lora = 0
    if mole is not None:
        J = mole.num_experts if mole.routing == "dense" else mole.top_k
        per_expert = 2 * mole.rank * (h + c.intermediate) + mole.rank * (c.intermediate + h)
        active_lora = L * (J * per_expert + (h + 1) * mole.num_experts)
        if mole.attn_lora:
            h_kv = h * c.kv_heads // c.heads
            active_lora += L * mole.rank * ((h + h) * 2 + (h + h_kv) * 2)
    frozen = n_decoder + c.lm_head_params
    attn = 2 * s.seq_len * h * L                              # per token, forward, causal
    per_token = 4 * frozen + 6 * active_lora + 3 * attn
    if s.checkpointing:
        per_token += 2 * n_decoder + 2 * active_lora + attn
    flops = per_token * T + 2 * c.vision_params * c.image_tokens * s.images_per_sample * s.micro_batch
    compute = flops * s.grad_accum / (dev.peak_flops * dev.mfu)
    # Expert traffic from the cost model (the same model mole.ep_size: auto uses).
    t_expert = a2a = 0.0
    if mole is not None and mole.num_experts:
        w = cm.Workload(tokens_per_rank=T, hidden=h, intermediate=c.intermediate, layers=L, rank=mole.rank,
                        num_experts=mole.num_experts, world_size=s.world_size, top_k=mole.top_k,
                        dense=mole.routing == "dense", weighted_rows=mole.routing in ("weighted", "st"),
                        micro_steps=s.grad_accum, zero_stage=max(s.zero_stage, 2), param_bytes=s.dtype_bytes,
                        persistence_threshold=s.persistence_threshold,
                        ranks_per_node=dev.ranks_per_node if dev.ranks_per_node < s.world_size else 0)
        pc = cm.placement_cost(w, s.ep_size, link)
        t_expert = pc.comm_s
        if s.ep_size > 1:
            a2a = cm.collective_time(pc.a2a_calls, pc.a2a_bytes_fwd + pc.a2a_bytes_bwd, link,
                           inter=bool(dev.ranks_per_node) and s.ep_size > dev.ranks_per_node)
    # ZeRO-3 gathers of everything else: twice per micro-step (forward, backward), (W-1)/W over the link.
    share = (s.world_size - 1) / s.world_size
    inter = bool(dev.ranks_per_node) and s.world_size > dev.ranks_per_node
    beta = link.beta_inter_Bps if inter and link.beta_inter_Bps else link.beta_Bps
    zero_bytes = 0.0
    calls = 0
    if s.zero_stage == 3 and s.world_size > 1:
        base = sum(n for name, n, back in c.modules if not any(t.expert for t in c.tensors if t.module == name))
        zero_bytes += 2 * base * s.dtype_bytes * share * s.grad_accum
        calls += 2 * len(c.modules) * s.grad_accum
    non_expert_trainable = c.numel(trainable=True, expert=False)
    if s.world_size > 1 and s.zero_stage >= 1:
        zero_bytes += non_expert_trainable * s.dtype_bytes * share * s.grad_accum
    t_zero = calls * link.alpha_s + zero_bytes / beta if zero_bytes else 0.0
    zero_expert = t_expert - a2a
    step = max(compute, t_zero + zero_expert) + a2a
    return Time(flops=flops * s.grad_accum, compute_s=compute, zero_s=t_zero, expert_comm_s=t_expert, a2a_s=a2a,
                step_s=step, step_serial_s=compute + t_zero + t_expert)


# -- verdict ---------------------------------------------------------------------------------------------------

@dataclass
class Verdict:
    fits: bool
    budget: float | None
    peak: float
    largest_micro_batch: int
    """The largest micro-batch whose peak fits (0: not even 1; equal to the configured one when it fits)."""
    message: str


def per_sample_bytes(c: Census, s: Setup, dev: Device) -> float:
    """How much the peak grows per extra sample of the micro-batch (activations are linear in tokens)."""
    one = plan_memory(c, _with(s, micro_batch=1), dev)
    two = plan_memory(c, _with(s, micro_batch=2), dev)
    return (two.peak - one.peak)


def _with(s: Setup, **kw) -> Setup:
    d = asdict(s)
    d.update(kw)
    return Setup(**d)


def verdict(c: Census, s: Setup, dev: Device, budget: float | None) -> Verdict:
    """Does the configured micro-batch fit ``budget`` bytes per rank? If not, the largest that does."""
    mem = plan_memory(c, s, dev)
    if budget is None:
        return Verdict(True, None, mem.peak, s.micro_batch, "no memory budget (host memory): nothing to check")
    if mem.peak <= budget:
        return Verdict(True, budget, mem.peak, _largest(c, s, dev, budget),
                       f"fits: {mem.peak / GiB:.1f} GiB of {budget / GiB:.1f} GiB per rank at micro-batch "
                       f"{s.micro_batch}")
    best = _largest(c, s, dev, budget)
    if best >= 1:
        return Verdict(False, budget, mem.peak, best,
                       f"does not fit at micro-batch {s.micro_batch} ({mem.peak / GiB:.1f} GiB > {budget / GiB:.1f} "
                       f"GiB); the largest micro-batch that fits is {best} (keep the global batch with "
                       f"gradient_accumulation_steps {math.ceil(s.micro_batch * s.grad_accum / best)})")
    hints = []
    if not s.checkpointing:
        ck = plan_memory(c, _with(s, micro_batch=1, checkpointing=True), dev)
        hints.append(f"train.gradient_checkpointing true ({ck.peak / GiB:.1f} GiB at micro-batch 1)")
    if s.zero_stage < 3:
        hints.append("zero_optimization.stage 3 (partitions the frozen base)")
    hints.append(f"a shorter data.max_length ({s.seq_len}) or more ranks")
    one = plan_memory(c, _with(s, micro_batch=1), dev)
    return Verdict(False, budget, mem.peak, 0,
                   f"does not fit even at micro-batch 1 ({one.peak / GiB:.1f} GiB > {budget / GiB:.1f} GiB); "
                   "try " + "; ".join(hints))


def _largest(c: Census, s: Setup, dev: Device, budget: float) -> int:
    lo, hi = 0, 1
    while plan_memory(c, _with(s, micro_batch=hi), dev).peak <= budget and hi < 1 << 16:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # peak is linear in micro-batch: bisection finds the boundary
        mid = (lo + hi) // 2
        if plan_memory(c, _with(s, micro_batch=mid), dev).peak <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def fitting_ep_sizes(c: Census, s: Setup, dev: Device, budget: float | None) -> list[int]:
    """The ep_size candidates (cost_model.candidate_ep_sizes) whose peak fits ``budget`` (all of them when
    there is no budget: on CPU nothing is excluded)."""
    if c.mole is None:
        return [1]
    cands = cm.candidate_ep_sizes(c.mole.num_experts, s.world_size)
    if budget is None:
        return cands
    return [p for p in cands if plan_memory(c, _with(s, ep_size=p), dev).peak <= budget]


def live_device() -> Device | None:
    """This process's GPU as a planner device (its total memory; H100 figures for the rest), or None without
    CUDA: on CPU there is no memory budget."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return dataclasses.replace(PRESETS["h100-nvlink-ib"], name=f"this GPU ({props.name})",
                               memory_bytes=int(props.total_memory), source="torch.cuda.get_device_properties")


def ep_sizes_that_fit(model_config, mole: MoLEConfig, ds: dict, world_size: int, seq_len: int,
                      checkpointing: bool = False) -> list[int] | None:
    """For ``mole.ep_size: auto``: the ep_size candidates whose predicted peak fits this GPU's memory, or None
    when there is no budget to check (no CUDA: the choice is left to the cost model alone, as before). ``ds``
    has bf16 resolved. A model whose config cannot be rebuilt on the meta device is not filtered (None)."""
    dev = live_device()
    if dev is None:
        return None
    try:
        c = census(model_config, dataclasses.replace(mole, ep_size=1))
    except (TypeError, ValueError, AttributeError):
        return None
    s = setup_from(ds, c.mole, world_size, seq_len, checkpointing=checkpointing)
    return fitting_ep_sizes(c, s, dev, dev.memory_bytes)


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '512MiB', '1.5e9' -> bytes."""
    t = text.strip().replace(" ", "")
    units = {"gib": GiB, "mib": MiB, "kib": 1024, "gb": 10**9, "mb": 10**6, "kb": 10**3, "tib": 1 << 40,
             "tb": 10**12, "g": GiB, "m": MiB, "b": 1}
    low = t.lower()
    for u in sorted(units, key=len, reverse=True):
        if low.endswith(u):
            try:
                return int(float(low[: -len(u)]) * units[u])
            except ValueError:
                break
    try:
        return int(float(low))
    except ValueError:
        raise ValueError(f"--gpu-mem ({text!r}) must be a size like 80GiB, 80GB or 512MiB") from None


__all__ = ["Device", "PRESETS", "preset", "Census", "census", "meta_model", "Setup", "setup_from", "problems",
           "Memory", "plan_memory", "layer_activation_bytes", "Time", "plan_time", "Verdict", "verdict",
           "per_sample_bytes", "fitting_ep_sizes", "live_device", "ep_sizes_that_fit", "parse_bytes", "GiB", "MiB"]
