"""A tiny LLaVA with MoLE trains on a fixed batch, and only the intended parameters change."""
import torch

import mole_ds
from mole_ds import MoLEConfig, patch_model
from mole_ds.models.tiny import build_tiny_llava
from tests.support import llava_inputs


def test_tiny_llava_mole_trains_only_intended_params():
    model = build_tiny_llava(seed=3)
    patch_model(model, MoLEConfig(num_experts=3, rank=8, alpha=16.0, dropout=0.0, routing="weighted",
                                  balance_coef=0.01, z_loss_coef=0.001))
    model.train()
    inputs = llava_inputs(model, seed=1)
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


def test_model_loss_times_supervised_tokens_is_the_token_sum():
    # train_step's token-weighted loss rests on this: the model's loss is the mean over exactly the tokens that
    # supervised_tokens counts (labels after the causal shift, other than -100), so mean * count = sum.
    from mole_ds.train.step import supervised_tokens

    model = build_tiny_llava(seed=3).eval()
    inputs = llava_inputs(model, seed=1)
    labels = inputs["input_ids"].clone()
    labels[inputs["input_ids"] == model.config.image_token_id] = -100
    labels[inputs["attention_mask"] == 0] = -100
    labels[0, : labels.shape[1] // 2] = -100  # rows with different numbers of supervised tokens
    labels[:, 0] = 7  # a label at position 0 is never a target (nothing predicts it)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    logits = out.logits[:, :-1].float()
    target = labels[:, 1:]
    token_sum = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
    n = supervised_tokens({"labels": labels})
    assert n == int((target != -100).sum()) and n < int((labels != -100).sum())
    torch.testing.assert_close(out.loss * n, token_sum, rtol=1e-5, atol=1e-5)
