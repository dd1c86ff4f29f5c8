"""One training step, written once: forward, aux loss, backward and optimizer step over the micro-batches
of one gradient-accumulation window. The training loop, the probe runs and the distributed test worker all
call :func:`train_step`, so fault handling and loss bookkeeping cannot drift between copies.

    record = train_step(engine, [next_batch() for _ in range(accum)])   # or a generator of micro-batches
    record.loss, record.aux_loss, record.tokens                         # this rank's means / sum
    loss, aux = record.global_means()                                   # collective: over all ranks

Algorithm of one step (a DeepSpeed engine counts micro-batches itself and only steps the optimizer at the
gradient-accumulation boundary):
  1. For each micro-batch: move tensors to the engine's device, cast pixel_values to the model's dtype,
     tell MoLE layers each sample's domain (``routing: oracle``) and, under ZeRO-3, whether this batch has
     images (VisionSync), then forward.
  2. The task loss is the mean over every supervised token of the optimizer step, on all ranks and
     micro-batches together (as Hugging Face's Trainer does with num_items_in_batch), not a mean of per-rank
     or per-micro-batch means: so a step's gradient does not depend on how its samples are split over ranks and
     micro-batches (an elastic resume on another world size continues the same training), and a long answer
     weighs as much as its tokens.  Before the first forward the supervised tokens of all micro-batches are
     counted and summed over ranks (N); a micro-batch's loss is then the model's mean times its own count n,
     scaled by world * accum / N (DeepSpeed divides by accum in backward and averages gradients over ranks).
     loss = that + aux loss of this forward (balance + z, per rank and micro-batch, zero when the model has no
     MoLE layers); ``engine.backward(loss)``, ``engine.step()``.
  3. ``observe(batch, out)`` (if given) runs after each forward, e.g. to add routing counts per domain.
  4. After the last micro-batch the engine must be at an accumulation boundary: a window of the wrong
     length is an error naming both numbers (it would silently shift every later optimizer step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from ..inference.scoring import exact_match_batch
from ..mole.collect import aux_loss
from ..mole.sample_routing import prompt_mask_from_labels
from ..patching import mole_layers, set_prompt_mask, set_sample_domains

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values")


@dataclass
class StepRecord:
    """What one optimizer step did on this rank."""

    losses: list[float] = field(default_factory=list)
    """Task loss of each micro-batch (the model's own loss: mean over its supervised tokens)."""
    loss_sum: float = 0.0
    """Task loss summed over this rank's supervised tokens (all micro-batches)."""
    supervised: int = 0
    """Supervised tokens of this rank (all micro-batches)."""
    auxes: list[float] = field(default_factory=list)
    """Aux loss (balance_coef * balance + z_loss_coef * z) of each micro-batch."""
    tokens: int = 0
    """Attention-mask tokens (image tokens included) over the micro-batches."""

    @property
    def loss(self) -> float:
        """This rank's task loss: mean over its supervised tokens."""
        return self.loss_sum / max(self.supervised, 1)

    @property
    def aux_loss(self) -> float:
        return sum(self.auxes) / max(len(self.auxes), 1)

    def global_means(self) -> tuple[float, float]:
        """(task loss over every supervised token of the step on all ranks, aux loss averaged over ranks)
        (collective: every rank calls it)."""
        t = torch.tensor([self.loss_sum, float(self.supervised), self.aux_loss], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(t)
            t[2] /= dist.get_world_size()
        return float(t[0] / t[1].clamp_min(1)), float(t[2])


def supervised_tokens(batch: dict) -> int:
    """Tokens the causal-LM loss is taken over: labels after the shift, other than -100."""
    return int((batch["labels"][:, 1:] != -100).sum())


def model_inputs_on(batch: dict, device, dtype: torch.dtype) -> dict:
    """The model's keyword arguments from a batch (extra keys such as domain_ids are dropped): tensors on
    ``device``, float pixel_values in ``dtype``, empty pixel_values (a text-only batch) as None."""
    inputs = {k: batch[k] for k in MODEL_KEYS if k in batch}
    pv = inputs.get("pixel_values")
    if pv is not None and pv.numel() == 0:
        inputs["pixel_values"] = None
    out = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
    if out.get("pixel_values") is not None:
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def forward(engine, batch: dict, vision_sync=None):
    """Step 1 for one micro-batch: the engine's forward on ``batch`` (train or eval mode alike)."""
    model = engine.module
    dtype = next(model.parameters()).dtype
    inputs = model_inputs_on(batch, engine.device, dtype)
    if vision_sync is not None:
        vision_sync.text_only = inputs.get("pixel_values") is None
    if mole_layers(model):
        dom = batch.get("domain_ids")
        set_sample_domains(model, dom.to(engine.device) if torch.is_tensor(dom) else None)
        # Sample-level routing pools each sample's prompt (the tokens before its first supervised one), never
        # its answer; without labels the whole input is the prompt.
        labels = inputs.get("labels")
        set_prompt_mask(model, None if labels is None else prompt_mask_from_labels(labels, inputs.get("attention_mask")))
    return engine(**inputs)


def exact_match_step(model, processor, batch: dict, max_new_tokens: int, vision_sync=None) -> list[bool]:
    """Per-sample exact match of greedy answers on this rank's ``batch``
    (``mole_ds.inference.scoring.exact_match_batch``), called on every rank together: decoding is synced
    across ranks, and under ZeRO-3 ``vision_sync`` (``mole_ds.train.zero3.VisionSync``) keeps a text-only
    rank's parameter fetches in step with ranks that have images."""
    if vision_sync is not None:
        pv = batch.get("pixel_values")
        vision_sync.before_generate(text_only=pv is None or pv.numel() == 0)
    if mole_layers(model):
        set_prompt_mask(model, None)  # generation: the prompt is the whole first input
    return exact_match_batch(model, processor, batch, max_new_tokens=max_new_tokens)


def train_step(engine, micro_batches: Iterable[dict], *, vision_sync=None,
               observe: Callable[[dict, object], None] | None = None) -> StepRecord:
    """One optimizer step over ``micro_batches`` (as many as the DeepSpeed config's
    gradient_accumulation_steps), with the task loss averaged over all supervised tokens of the step (step 2).

    Raises FloatingPointError naming the micro-batch when its loss is not finite (every later step would be
    wasted), and ValueError when the window length does not match the engine's accumulation."""
    model = engine.module
    has_mole = bool(mole_layers(model))
    batches = list(micro_batches)
    accum = int(engine.gradient_accumulation_steps())
    if len(batches) != accum:
        raise ValueError(f"train_step got {len(batches)} micro-batch(es); the DeepSpeed config's "
                         f"gradient_accumulation_steps is {accum}: give exactly that many per step")
    counts = [supervised_tokens(b) for b in batches]
    total = torch.tensor([float(sum(counts))], dtype=torch.float64)
    world = 1
    if dist.is_initialized():
        dist.all_reduce(total)
        world = dist.get_world_size()
    scale = world * accum / max(float(total), 1.0)
    rec = StepRecord()
    for n, (batch, count) in enumerate(zip(batches, counts)):
        out = forward(engine, batch, vision_sync)
        aux = aux_loss(model) if has_mole else out.loss.new_zeros(())
        task = float(out.loss.detach())
        if not math.isfinite(task) and count > 0:
            raise FloatingPointError(f"loss is {task} at micro-batch {n} of this step (ids "
                                     f"{list(batch.get('ids', []))[:4]}): check the learning rate and the data")
        # The model's mean times its count is the sum over its tokens; no supervised token: nothing to learn,
        # but the backward still runs (every rank takes part in its collectives).
        task_sum = out.loss * count if count > 0 else out.logits.sum() * 0.0
        engine.backward(task_sum * scale + aux)
        engine.step()
        rec.losses.append(task if count > 0 else 0.0)
        rec.loss_sum += task * count if count > 0 else 0.0
        rec.supervised += count
        rec.auxes.append(float(aux.detach()))
        rec.tokens += int(batch["attention_mask"].sum())
        if observe is not None:
            observe(batch, out)
    if engine.micro_steps % accum:
        raise ValueError(f"the engine is at micro-step {engine.micro_steps}, not at a gradient-accumulation "
                         f"boundary of {accum}")
    return rec


__all__ = ["StepRecord", "forward", "model_inputs_on", "supervised_tokens", "train_step"]
