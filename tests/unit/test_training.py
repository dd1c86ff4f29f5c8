"""A tiny LLaVA with MoLE trains on a fixed batch, and only the intended parameters change."""
import torch

import mole_ds
from mole_ds import MoLEConfig, patch_model
from mole_ds.models.tiny import build_tiny_llava
from tests.unit.test_patching import _llava_inputs


def test_tiny_llava_mole_trains_only_intended_params():
    model = build_tiny_llava(seed=3)
    patch_model(model, MoLEConfig(num_experts=3, rank=8, alpha=16.0, dropout=0.0, routing="weighted",
                                  balance_coef=0.01, z_loss_coef=0.001))
    model.train()
    inputs = _llava_inputs(model, seed=1)
    labels = inputs["input_ids"].clone()
    labels[inputs["input_ids"] == model.config.image_token_id] = -100
    labels[inputs["attention_mask"] == 0] = -100
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(8):
        out = model(**inputs, labels=labels)
        loss = out.loss + mole_ds.aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in model.named_parameters():
        moved = not torch.equal(p.detach(), before[n])
        if p.requires_grad:
            assert moved, f"trainable {n} did not change"
        else:
            assert not moved, f"frozen {n} changed"
