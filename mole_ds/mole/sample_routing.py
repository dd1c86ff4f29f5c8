"""Sample-level routing (``mole.routing_level: sample``): one routing decision per sample and layer.

What ``oracle`` does with a domain id, learned: each sample picks its expert(s) once per layer from a pooled
representation of its prompt, and every token of the sample follows that choice. The compute stays that of
the routing mode (one expert per token for sparse/st/weighted top-1); the dispatcher sees ordinary per-token
rows, so expert parallelism needs nothing new.

Algorithm of :func:`sample_logits_TE` (called by ``MoLEMLP.forward``):
  1. Which tokens are the prompt: the real tokens (attention mask 1) of this forward, restricted to the
     layer's ``prompt_mask`` when one is set (``mole_ds.set_prompt_mask``; in training it must be set, because
     the input then also holds the answer, which routing must not see: :func:`prompt_mask_from_labels` gives
     "real tokens before the first supervised one"). Without a prompt mask, in eval mode, the whole input is
     the prompt: that is the first step of generation.
  2. Pool: the fp32 mean of the layer's MLP input over those tokens, (B, D).
  3. Route the pooled vector (the layer's router, with its temperature / norm / noise): (B, E) logits; every
     token of sample b gets sample b's logits, so the ordinary routing modes turn them into per-token rows.
  4. Generation with a KV cache: a step that continues a cache (the layer's ``past_length`` > 0, or an
     attention mask longer than its input) continues earlier steps; it reuses the logits the layer kept from
     the step that saw the prompt (kept per sample until the next step that starts a sequence). So generate's
     routing equals a full forward's with the prompt mask. (The mask alone does not tell: generate passes
     no mask when it is all ones, e.g. batch 1; each decoding step would then route its one new token.)
     A recompute under activation checkpointing re-runs step 1-3 on the same input and masks (the cache is
     neither read nor written there).
"""
from __future__ import annotations

import torch


def prompt_mask_from_labels(labels_BS: torch.Tensor, attention_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S) bool: the real tokens before each sample's first supervised token (label != -100).

    Later unsupervised spans (a second user turn) are left out on purpose: the first reply is generated
    without them, and routing must not look ahead. A sample with no supervised token is all prompt."""
    supervised_BS = labels_BS != -100
    before_BS = supervised_BS.long().cumsum(1) == 0
    if attention_mask_BS is not None:
        before_BS = before_BS & attention_mask_BS.bool()
    return before_BS


def pool_prompt_BD(x_BSD: torch.Tensor, pool_BS: torch.Tensor) -> torch.Tensor:
    """Step 2: fp32 mean of x over the tokens with pool 1 (a sample with none gets zeros)."""
    w_BS = pool_BS.to(torch.float32)
    sum_BD = torch.einsum("bsd,bs->bd", x_BSD.float(), w_BS)
    return sum_BD / w_BS.sum(1, keepdim=True).clamp_min(1.0)


def sample_logits_TE(layer, x_TD: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """Steps 1-4 for one MoLE layer (``layer``: a MoLEMLP): per-token fp32 logits, equal within a sample."""
    E = layer.config.num_experts
    m = layer.token_mask
    past = layer.past_length
    if past > 0 or (m is not None and m.dim() == 2 and m.shape[1] > S):  # step 4: a KV-cache step
        cached = layer.sample_logits_BE
        if cached is None or cached.shape[0] != B:
            seen = past if past > 0 else m.shape[1] - S
            raise ValueError(f"MoLE layer {layer.layer_idx}: routing_level 'sample' got a cached-decoding step "
                             f"({S} new tokens after {seen} cached) without a prompt step of the same batch "
                             f"({B}) before it")
        logits_BE = cached.to(x_TD.device)
    else:
        pool_BS = layer._mask_BS(B, S, x_TD.device)  # step 1
        pm = layer.prompt_mask
        if pm is not None:
            if pm.dim() != 2 or tuple(pm.shape) != (B, S):
                raise ValueError(f"MoLE layer {layer.layer_idx}: prompt mask of shape {tuple(pm.shape)} does not "
                                 f"match hidden states of batch {B} and length {S}")
            pool_BS = pool_BS * pm.to(device=x_TD.device, dtype=pool_BS.dtype)
        elif layer.training:
            raise ValueError("mole.routing_level ('sample') needs the prompt span in training (the input also "
                             "holds the answer): call mole_ds.set_prompt_mask(model, "
                             "prompt_mask_from_labels(labels, attention_mask)) before the forward")
        logits_BE = layer.router(pool_prompt_BD(x_TD.view(B, S, -1), pool_BS))  # steps 2-3
        if not layer.recomputing:
            layer.sample_logits_BE = logits_BE.detach()
    return logits_BE[:, None, :].expand(B, S, E).reshape(B * S, E)


__all__ = ["pool_prompt_BD", "prompt_mask_from_labels", "sample_logits_TE"]
