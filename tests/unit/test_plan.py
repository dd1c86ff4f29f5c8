"""The planner (mole_ds.parallel.memory_model, tools/plan.py): terms against hand counts, the activation formula
against autograd's saved tensors, the verdict, and the CLI's refusals."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from mole_ds import MoLEConfig
from mole_ds.parallel import cost_model as cm
from mole_ds.parallel import memory_model as mm

ROOT = Path(__file__).resolve().parents[2]
CFG_7B = ROOT / "launchers/configs/models/llava-1.5-7b/config.json"
CPU = mm.preset("cpu-gloo-here")
H100 = mm.preset("h100-nvlink-ib")


def _saved_bytes_per_layer(h, I, r, E, k, dropout, dtype, T=64):
    """Bytes autograd saves for one decoder layer per token: (2-layer model - 1-layer model) / T, counting each
    storage once and no parameter or buffer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mole_ds.patching import patch_model

    out = []
    for layers in (1, 2):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, hidden_size=h, intermediate_size=I, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2)
        m = LlamaForCausalLM(cfg).to(dtype)
        patch_model(m, MoLEConfig(num_experts=E, top_k=k, rank=r, alpha=2 * r, dropout=dropout))
        m.train()
        skip = {t.untyped_storage().data_ptr() for t in list(m.parameters()) + list(m.buffers())}
        seen = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in skip:
                seen[s.data_ptr()] = s.nbytes()
            return t

        ids = torch.randint(0, 256, (1, T))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(input_ids=ids, labels=ids)
        out.append(sum(seen.values()))
    return (out[1] - out[0]) / T


@pytest.mark.parametrize("dtype,b", [(torch.bfloat16, 2), (torch.float32, 4)])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("k", [1, 2])
def test_layer_activation_formula_matches_saved_tensors(dtype, b, dropout, k):
    from transformers import LlamaConfig

    h, I, r, E = 96, 160, 8, 4
    measured = _saved_bytes_per_layer(h, I, r, E, k, dropout, dtype)
    cfg = LlamaConfig(vocab_size=256, hidden_size=h, intermediate_size=I, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    c = mm.census(cfg, MoLEConfig(num_experts=E, top_k=k, rank=r, alpha=2 * r, dropout=dropout))
    pred = mm.layer_activation_bytes(c, mm.Setup(world_size=1, micro_batch=1, seq_len=64, dtype_bytes=b), CPU)
    assert pred == pytest.approx(measured, rel=0.01)


def test_layer_activation_formula_by_hand():
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4)
    c = mm.census(cfg, MoLEConfig(num_experts=4, top_k=1, rank=8, alpha=16, dropout=0.0))
    s = mm.Setup(world_size=1, micro_batch=1, seq_len=64, dtype_bytes=2)
    h, I, r, b = 64, 128, 8, 2
    by_hand = (8 * h + 8) + b * h + 4 * b * r + b * 4 * h + 4 * 4 + (4 * h + 8 * 4 + 16 + 8) \
        + (b * h + 3 * b * I + b * I + 3 * b * r + 16)
    assert mm.layer_activation_bytes(c, s, CPU) == by_hand
    # On CUDA a dropout mask is one byte per element; on CPU it has the activation dtype.
    cd = mm.census(cfg, MoLEConfig(num_experts=4, top_k=1, rank=8, alpha=16, dropout=0.1))
    assert mm.layer_activation_bytes(cd, s, CPU) - mm.layer_activation_bytes(cd, s, H100) == (4 * h + h + I) * (b - 1)


@pytest.fixture(scope="module")
def c7b():
    return mm.census(CFG_7B, MoLEConfig(num_experts=4, rank=32, alpha=64))


def test_7b_census_matches_published_sizes(c7b):
    h, I, L, V = 4096, 11008, 32, 32064
    llm = 2 * V * h + L * (4 * h * h + 3 * h * I + 2 * h) + h
    projector = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert c7b.numel(trainable=False) == llm + projector + c7b.vision_params
    assert c7b.numel(trainable=False) == pytest.approx(7.06e9, rel=0.005)  # LLaVA-1.5-7B
    assert c7b.image_tokens == 576
    # Experts: r (3h + 3I) per expert per layer; attention LoRA: r (h + h) per projection; routers: (h + 1) E.
    assert c7b.numel(trainable=True, expert=True) == 4 * L * 32 * (3 * h + 3 * I)
    assert c7b.numel(trainable=True, expert=False) == L * (4 * 32 * 2 * h + (h + 1) * 4)


def test_7b_memory_terms_by_hand(c7b):
    s = mm.Setup(world_size=8, micro_batch=16, seq_len=2048, dtype_bytes=2, zero_stage=3)
    m = mm.plan_memory(c7b, s, H100)
    frozen = c7b.numel(trainable=False)
    # ZeRO-3: frozen tensors partitioned over 8 ranks (norms, <= 1e5 elements, whole on every rank).
    persistent = sum(t.numel for t in c7b.tensors if not t.trainable and t.numel <= 100_000)
    assert m.base_params == pytest.approx(2 * ((frozen - persistent) / 8 + persistent), rel=1e-4)
    trainable = c7b.numel(trainable=True)
    assert m.mole_optim == pytest.approx(12 * trainable / 8, rel=1e-4)   # fp32 master + 2 moments, /W
    assert m.mole_grads == pytest.approx(2 * trainable / 8, rel=1e-4)
    assert m.base_grads == m.base_optim == 0
    assert m.grad_bucket == 2 * 500_000_000                          # GPU: the bucket is allocated whole
    T = 16 * 2048
    logits = (2 + 12) * 32064 * T
    assert m.working == logits
    assert m.activations_ckpt == pytest.approx(32 * 2 * 4096 * T + (4 * 4096 + 4) * T + logits)
    # ep_size 4: each rank holds 1 of 4 experts, partitioned over the 2 ranks of its expert-data group: the same
    # partitioned bytes; ZeRO-2: full frozen copy on every rank.
    m4 = mm.plan_memory(c7b, dataclasses.replace(s, ep_size=4), H100)
    assert m4.mole_optim == pytest.approx(m.mole_optim, rel=1e-4)
    m2 = mm.plan_memory(c7b, dataclasses.replace(s, zero_stage=2), H100)
    assert m2.base_params == 2 * frozen and m2.zero3_gathers == 0


def test_verdict_fits_largest_and_nothing(c7b):
    s = mm.Setup(world_size=8, micro_batch=16, seq_len=2048, dtype_bytes=2, checkpointing=True)
    assert mm.verdict(c7b, s, H100, 80 * mm.GiB).fits
    no = dataclasses.replace(s, checkpointing=False)
    v = mm.verdict(c7b, no, H100, 80 * mm.GiB)
    assert not v.fits and 1 <= v.largest_micro_batch < 16
    assert mm.plan_memory(c7b, dataclasses.replace(no, micro_batch=v.largest_micro_batch), H100).peak <= 80 * mm.GiB
    assert mm.plan_memory(c7b, dataclasses.replace(no, micro_batch=v.largest_micro_batch + 1), H100).peak > 80 * mm.GiB
    assert f"largest micro-batch that fits is {v.largest_micro_batch}" in v.message
    v0 = mm.verdict(c7b, no, H100, 8 * mm.GiB)
    assert not v0.fits and v0.largest_micro_batch == 0
    assert "train.gradient_checkpointing true" in v0.message
    assert mm.verdict(c7b, s, CPU, None).fits  # host memory: no budget


def test_time_flops_by_hand(c7b):
    s = mm.Setup(world_size=8, micro_batch=1, seq_len=2048, dtype_bytes=2)
    t = mm.plan_time(c7b, s, H100)
    ck = mm.plan_time(c7b, dataclasses.replace(s, checkpointing=True), H100)
    frozen = c7b.decoder_matmul_params + c7b.lm_head_params
    assert t.flops > 4 * frozen * 2048 and ck.flops > t.flops
    # Checkpointing re-runs the decoder forward: its frozen matmuls, its attention (2 s h per layer), its LoRA.
    attn = 2 * 2048 * 4096 * 32
    assert (ck.flops - t.flops) == pytest.approx((2 * c7b.decoder_matmul_params + attn) * 2048, rel=0.02)
    assert t.compute_s == pytest.approx(t.flops / (989e12 * 0.40))


def test_ep_filter_is_a_noop_without_gpu(c7b):
    s = mm.Setup(world_size=8, micro_batch=1, seq_len=512)
    assert mm.fitting_ep_sizes(c7b, s, CPU, None) == cm.candidate_ep_sizes(4, 8)
    assert mm.fitting_ep_sizes(c7b, s, H100, 1 * mm.GiB) == []
    if not torch.cuda.is_available():
        assert mm.ep_sizes_that_fit(CFG_7B, MoLEConfig(num_experts=4), {"bf16": {"enabled": True}}, 8, 512) is None
    w = cm.Workload(tokens_per_rank=128, hidden=64, intermediate=128, layers=2, rank=8, num_experts=256, world_size=2)
    free, _ = cm.choose_ep_size(w, cm.Link(1e-4, 1e9))
    assert free == 2
    assert cm.choose_ep_size(w, cm.Link(1e-4, 1e9), allowed=[1])[0] == 1
    assert cm.choose_ep_size(w, cm.Link(1e-4, 1e9), allowed=[])[0] == free  # nothing fits: unchanged choice


def test_parse_bytes():
    assert mm.parse_bytes("80GiB") == 80 << 30
    assert mm.parse_bytes("80GB") == 80 * 10 ** 9
    assert mm.parse_bytes("512MiB") == 512 << 20
    with pytest.raises(ValueError, match=r"--gpu-mem \('lots'\)"):
        mm.parse_bytes("lots")


# -- the CLI ---------------------------------------------------------------------------------------------------

def _plan(capsys, *args):
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_tool", ROOT / "tools/plan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--deepspeed", str(ROOT / "ds_configs/zero3_ep.json"), *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_tiny_embedded_model_fits(capsys, tmp_path):
    rc, out, _ = _plan(capsys, "--world-size", 2, "--preset", "cpu-gloo-here", "--gpu-mem", "4GiB",
                       "--out-json", tmp_path / "p.json")
    assert rc == 0, out
    assert "verdict: fits" in out and "per rank (GiB)" in out
    rec = json.loads((tmp_path / "p.json").read_text())
    assert rec["setup"]["ep_size"] == 2 and rec["verdict"]["fits"]


def test_cli_7b_does_not_fit_without_checkpointing(capsys):
    rc, out, _ = _plan(capsys, "--model-config", CFG_7B, "--world-size", 8, "--gpu-mem", "80GiB",
                       "--micro-batch", 16, "--data.max_length", 2048, "--mole.ep_size", 1, "--mole.rank", 32)
    assert rc == 1
    assert "does not fit at micro-batch 16" in out and "largest micro-batch that fits is" in out
    rc, out, _ = _plan(capsys, "--model-config", CFG_7B, "--world-size", 8, "--gpu-mem", "80GiB",
                       "--micro-batch", 16, "--data.max_length", 2048, "--mole.ep_size", "auto",
                       "--train.gradient_checkpointing", "true")
    assert rc == 0 and "verdict: fits" in out and "mole.ep_size auto ->" in out


@pytest.mark.parametrize("args,message", [
    (("--mole.num_experts", 6, "--mole.ep_size", 4, "--world-size", 4),
     "mole.num_experts (6) must be divisible by mole.ep_size (4)"),
    (("--mole.ep_size", 4, "--world-size", 2), "mole.ep_size (4) must be <= world size (2)"),
    (("--world-size", 2, "--gpu-mem", "lots"), "--gpu-mem ('lots') must be a size"),
    (("--model-config", "/nonexistent/config.json"), "--model-config ('/nonexistent/config.json') has no config.json"),
    (("--world-size", 2, "--mole.bogus", 1), "unknown key(s) in section 'mole': bogus"),
])
def test_cli_refusals_exit_2_naming_the_field(capsys, args, message):
    rc, _, err = _plan(capsys, *args)
    assert rc == 2
    assert message in err


def test_reuse_distance_keeps_trailing_modules(c7b):
    s = mm.Setup(world_size=8, micro_batch=1, seq_len=128)
    big = mm.plan_memory(c7b, s, H100).zero3_gathers
    small = mm.plan_memory(c7b, dataclasses.replace(s, max_reuse_distance=0, prefetch_bucket=0), H100).zero3_gathers
    # No reuse, no prefetch: only the largest module (lm_head, 32064 x 4096) is ever whole.
    assert small == 2 * 32064 * 4096
    assert big == pytest.approx(2 * (5e8 + 5e7 + 32064 * 4096), rel=0.05)
    assert not math.isnan(big)
