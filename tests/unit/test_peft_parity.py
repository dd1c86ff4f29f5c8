"""MoLE with one expert is plain LoRA: it matches PEFT's LoRA on gate/up/down, forward and backward."""
import copy

import torch
from peft import LoraConfig, get_peft_model

from mole_ds import MoLEConfig, patch_model
from mole_ds.models.tiny import build_tiny_llama


def test_single_expert_equals_peft_lora():
    base = build_tiny_llama(seed=1)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["gate_proj", "up_proj", "down_proj"]))
    mole = copy.deepcopy(base)
    patch_model(mole, MoLEConfig(num_experts=1, rank=4, alpha=8.0, dropout=0.0, attn_lora=False))

    torch.manual_seed(0)
    for i, layer in enumerate(mole.model.layers):
        peft_mlp = peft_model.base_model.model.model.layers[i].mlp
        for proj in ("gate", "up", "down"):
            A, B = layer.mlp.experts.pair(proj)
            plora = getattr(peft_mlp, f"{proj}_proj")
            with torch.no_grad():
                B.normal_(0, 0.1)  # non-zero so the deltas matter
                plora.lora_A["default"].weight.copy_(A[0])
                plora.lora_B["default"].weight.copy_(B[0])

    ids = torch.randint(0, 128, (2, 12))
    out_m = mole(input_ids=ids, labels=ids)
    out_p = peft_model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_m.logits, out_p.logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out_m.logits, base(input_ids=ids).logits, atol=1e-3)  # the LoRA is live
    out_m.loss.backward()
    out_p.loss.backward()
    for i, layer in enumerate(mole.model.layers):
        peft_mlp = peft_model.base_model.model.model.layers[i].mlp
        for proj in ("gate", "up", "down"):
            A, B = layer.mlp.experts.pair(proj)
            plora = getattr(peft_mlp, f"{proj}_proj")
            torch.testing.assert_close(A.grad[0], plora.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(B.grad[0], plora.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)
