"""Patching real transformers models: equality at init, what is frozen, what the report says."""
import re

import pytest
import torch

import mole_ds
from mole_ds import MoLEConfig, patch_model
from mole_ds.models.tiny import build_tiny_llama, build_tiny_llava
from tests.support import llava_inputs

CFG = dict(num_experts=4, rank=4, alpha=8.0, dropout=0.0)


def test_patched_llama_equals_base_at_init():
    model = build_tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    ref = model(input_ids=ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = patch_model(model, MoLEConfig(**CFG))
    out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # Base weight values are unchanged; the keys too, except attention projections, which LoRALinear wraps
    # as PEFT does (q_proj.weight -> q_proj.base_layer.weight).
    after = model.state_dict()
    attn = re.compile(r"(self_attn\.[qkvo]_proj)\.(weight|bias)$")
    for k, v in before.items():
        k2 = attn.sub(r"\1.base_layer.\2", k)
        assert (k2 != k) == bool(attn.search(k)) and torch.equal(after[k2], v), k
    assert report.layers == 2 and len(report.mole_modules) == 2 and len(report.attn_lora_modules) == 8


@pytest.mark.parametrize("routing", ["sparse", "weighted", "st", "dense"])
def test_patched_llava_equals_base_at_init(routing):
    model = build_tiny_llava()
    inputs = llava_inputs(model)
    ref = model(**inputs).logits
    report = patch_model(model, MoLEConfig(routing=routing, **CFG))
    # Dense mixes E identical MLP outputs with weights p that sum to 1 up to rounding: exact to ~1 ulp only.
    tol = 1e-6 if routing == "dense" else 0.0
    torch.testing.assert_close(model(**inputs).logits, ref, rtol=0, atol=tol)
    # The vision tower is untouched and frozen; only the language model was patched.
    assert not any(isinstance(m, mole_ds.MoLEMLP) for m in model.model.vision_tower.modules())
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert not any(p.requires_grad for p in model.model.multi_modal_projector.parameters())
    assert report.model_class == "LlavaForConditionalGeneration"
    # Pad tokens are not routed: 2 samples, image + text tokens, minus 3 pads.
    n = inputs["attention_mask"].sum().item()
    counts = mole_ds.routing_counts(model)
    assert counts.shape == (2, 4) and torch.all(counts.sum(1) == n)


def test_trainable_set_and_report_counts():
    model = build_tiny_llava()
    report = patch_model(model, MoLEConfig(train_projector=True, **CFG))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n in trainable:
        assert (".experts." in n or ".router." in n or ".lora_" in n or "multi_modal_projector" in n), n
    assert any(".lora_A" in n for n in trainable) and any("experts.down_B" in n for n in trainable)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.trainable_params == n_trainable
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert sum(report.trainable_by_kind.values()) == n_trainable
    # Expert tensors have the documented shapes.
    mlp = model.model.language_model.layers[0].mlp
    D, F, r, E = 64, 128, 4, 4
    assert mlp.experts.gate_A.shape == (E, r, D) and mlp.experts.down_A.shape == (E, r, F)
    assert mlp.experts.gate_B.shape == (E, F, r) and mlp.experts.down_B.shape == (E, D, r)
    assert mlp.router.weight.shape == (E, D) and mlp.router.bias.shape == (E,)
    assert torch.count_nonzero(mlp.experts.up_B) == 0 and "x 4 experts" in str(report)


def test_no_attention_lora_option_and_errors():
    model = build_tiny_llama()
    report = patch_model(model, MoLEConfig(attn_lora=False, **CFG))
    assert report.attn_lora_modules == [] and "attn_lora" not in report.trainable_by_kind
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model, MoLEConfig(**CFG))
    with pytest.raises(TypeError, match="cannot find a decoder stack"):
        patch_model(torch.nn.Linear(3, 3), MoLEConfig(**CFG))
    with pytest.raises(ValueError, match=r"mole.train_projector \(True\) but LlamaForCausalLM has no"):
        patch_model(build_tiny_llama(), MoLEConfig(train_projector=True, **CFG))


def test_router_math_is_fp32_in_bf16_model():
    model = build_tiny_llama(dtype=torch.bfloat16)
    patch_model(model, MoLEConfig(**CFG))
    mlp = model.model.layers[0].mlp
    out = mlp.router.route(mlp.router(torch.randn(5, 64, dtype=torch.bfloat16)))
    assert out.logits_TE.dtype == torch.float32 and out.probs_TE.dtype == torch.float32
    y = model(input_ids=torch.randint(0, 128, (1, 8))).logits
    assert y.dtype == torch.bfloat16


def test_patched_eval_model_stays_in_eval_mode():
    # With dropout > 0, a patched eval-mode model must be deterministic (new LoRA modules join in eval mode).
    model = build_tiny_llama().eval()
    patch_model(model, MoLEConfig(num_experts=4, rank=4, alpha=8.0, dropout=0.5))
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
        ids = torch.randint(0, 128, (1, 9))
        torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    model.train()
    assert all(m.training for m in model.modules())
