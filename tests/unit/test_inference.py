"""mole_ds.inference: training-identical prompts, batched greedy generation, loglikelihood, routing counts,
exact match on collated training batches, and the errors for exports and bases that do not fit."""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from mole_ds import inference
from mole_ds.data.chat import build_prompt
from mole_ds.data.collate import SampleEncoder, collate
from mole_ds.data.samples import Record
from tests.support import make_tiny_export

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}


def image(color: str) -> Image.Image:
    im = Image.new("RGB", (40, 30), (255, 255, 255))
    im.paste(COLORS[color], (8, 6, 32, 24))
    return im


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_export(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def m(tiny):
    return inference.load_for_inference(tiny[1])


QUESTIONS = ["What color is the shape?", "Describe the image in detail.", "What is the title of the table?",
             "Explain why the sky is blue."]
IMAGES = [[image("red")], [image("green")], [image("blue")], []]


def test_load_uses_recorded_base_and_chat_format(m, tiny):
    assert m.base == tiny[0] and m.export == tiny[1] and m.is_llava
    assert m.chat_format == "vicuna_v1"  # nothing recorded: the default
    assert m.report.layers == 2 and m.config.num_experts == 3 and not m.model.training


def test_prompt_ids_are_the_training_ids(m):
    """The prompt of generation is, token for token, the training sample up to its first supervised token."""
    for q, ims in zip(QUESTIONS, IMAGES):
        enc = SampleEncoder(m.processor, ["general"], max_length=512, chat_format=m.chat_format)
        png = None
        if ims:
            buf = io.BytesIO()
            ims[0].save(buf, format="png")
            png = buf.getvalue()
        conv = [inference.user_turn(q, len(ims)), {"from": "gpt", "value": "Red"}]
        s = enc(Record("x", "general", conv, png, "png" if png else None, "k", "u"))
        first = next(i for i, lab in enumerate(s.labels) if lab != -100)
        p = inference.encode_prompt(m, q, ims)
        assert p.ids == s.input_ids[:first]
        assert (p.pixel_values is None) == (s.pixel_values is None)
        if ims:
            torch.testing.assert_close(p.pixel_values[0], s.pixel_values, rtol=0, atol=0)
    text = inference.generation_prompt(QUESTIONS[0], 1, "vicuna_v1", m.tokenizer)
    assert text == build_prompt([{"from": "human", "value": "<image>\n" + QUESTIONS[0]}], "vicuna_v1", m.tokenizer)
    assert text.endswith("USER: <image>\nWhat color is the shape? ASSISTANT:")


TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }}{% else %} ASSISTANT: "
            "{{ m['content'] }}</s>{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}")


def test_recorded_chat_format_is_used_and_template_prompts_are_the_training_ids(tmp_path):
    """An export trained with chat_format 'template' prompts through the tokenizer's chat template, with the
    ids of the training path; an explicit chat_format overrides the recorded one."""
    _, path = make_tiny_export(tmp_path, extra={"chat_format": "template"})
    tm = inference.load_for_inference(path)
    assert tm.chat_format == "template"
    assert inference.load_for_inference(path, chat_format="vicuna_v1").chat_format == "vicuna_v1"
    tm.tokenizer.chat_template = TEMPLATE
    enc = SampleEncoder(tm.processor, ["general"], max_length=512, chat_format="template")
    buf = io.BytesIO()
    IMAGES[0][0].save(buf, format="png")
    conv = [inference.user_turn(QUESTIONS[0], 1), {"from": "gpt", "value": "Red"}]
    s = enc(Record("x", "general", conv, buf.getvalue(), "png", "k", "u"))
    first = next(i for i, lab in enumerate(s.labels) if lab != -100)
    p = inference.encode_prompt(tm, QUESTIONS[0], IMAGES[0])
    assert p.ids == s.input_ids[:first]
    assert tm.tokenizer.decode(p.ids).endswith("USER: " + "<image>" * 16 + "\nWhat color is the shape? ASSISTANT:")
    assert inference.generate(tm, QUESTIONS[:1], IMAGES[:1], max_new_tokens=2).texts[0]


def test_batched_generation_equals_one_at_a_time(m):
    """Left padding, images in order, text-only rows in an image batch: batch 4 == batch 1, token for token."""
    batched = inference.generate(m, QUESTIONS, IMAGES, max_new_tokens=8, batch_size=4)
    for i, (q, ims) in enumerate(zip(QUESTIONS, IMAGES)):
        one = inference.generate(m, [q], [ims], max_new_tokens=8, batch_size=1)
        assert one.token_ids[0] == batched.token_ids[i] and one.texts[0] == batched.texts[i]
    assert all(batched.texts) and len(set(batched.texts)) == len(QUESTIONS)


def test_first_token_is_the_argmax_of_the_prompt(m):
    p = inference.encode_prompt(m, QUESTIONS[0], IMAGES[0])
    with torch.no_grad():
        logits = m.model(input_ids=torch.tensor([p.ids]), pixel_values=p.pixel_values).logits
    gen = inference.generate(m, QUESTIONS[:1], IMAGES[:1], max_new_tokens=1)
    assert gen.token_ids[0] == [logits[0, -1].argmax().item()]


def test_routing_counts_cover_prompt_and_fed_tokens(m):
    """Per request: every layer routed top_k x (prompt + generated - 1) tokens; padding is not counted."""
    gen = inference.generate(m, QUESTIONS, IMAGES, max_new_tokens=6, batch_size=4, routing=True)
    for i, (q, ims) in enumerate(zip(QUESTIONS, IMAGES)):
        n_prompt = len(inference.encode_prompt(m, q, ims).ids)
        fed = n_prompt + len(gen.token_ids[i]) - 1
        c = gen.routing[i]
        assert c.shape == (2, 3)
        assert c.sum(-1).tolist() == [float(fed * m.config.top_k)] * 2
    assert len({tuple(c.flatten().tolist()) for c in gen.routing}) == len(QUESTIONS)


def test_loglikelihood_matches_a_manual_forward(m):
    conts = [" Red", " A green circle", " yes", " Because of scattering"]
    s = inference.loglikelihood(m, QUESTIONS, conts, IMAGES, batch_size=4, routing=True)
    for i, (q, ims, c) in enumerate(zip(QUESTIONS, IMAGES, conts)):
        p = inference.encode_prompt(m, q, ims)
        whole = inference.encode_prompt(m, q, ims, c).ids
        assert whole[: len(p.ids)] == p.ids
        with torch.no_grad():
            logp = m.model(input_ids=torch.tensor([whole]), pixel_values=p.pixel_values).logits[0].log_softmax(-1)
        ref = sum(logp[t - 1, whole[t]].item() for t in range(len(p.ids), len(whole)))
        assert s.logprobs[i] == pytest.approx(ref, abs=1e-4)
        assert s.routing[i].sum(-1).tolist() == [float(len(whole))] * 2
        assert s.greedy[i] == all(logp[t - 1].argmax().item() == whole[t] for t in range(len(p.ids), len(whole)))
    # the model's own greedy answer (whose text tokenizes back to the same ids) scores as greedy
    gen = inference.generate(m, QUESTIONS[:1], IMAGES[:1], max_new_tokens=2)
    greedy_text = m.tokenizer.decode(gen.token_ids[0])
    assert inference.encode_prompt(m, QUESTIONS[0], IMAGES[0], greedy_text).ids[-2:] == gen.token_ids[0]
    assert inference.loglikelihood(m, QUESTIONS[:1], [greedy_text], IMAGES[:1]).greedy == [True]
    assert s.greedy == [False] * 4


def _batch(m, records: list[tuple[str, list, str]]) -> dict:
    """A collated training batch through the real data path (SampleEncoder + collate)."""
    enc = SampleEncoder(m.processor, ["general", "text"], max_length=512, chat_format=m.chat_format)
    samples = []
    for k, (q, ims, answer) in enumerate(records):
        png = None
        if ims:
            buf = io.BytesIO()
            ims[0].save(buf, format="png")
            png = buf.getvalue()
        conv = [inference.user_turn(q, len(ims)), {"from": "gpt", "value": answer}]
        samples.append(enc(Record(f"s{k}", "general" if ims else "text", conv, png, "png" if png else None,
                                  f"k{k}", "u")))
    return collate(samples, m.tokenizer.pad_token_id)


def test_exact_match_batch_on_a_collated_batch(m):
    gen = inference.generate(m, QUESTIONS, IMAGES, max_new_tokens=4, batch_size=4)
    # references: the model's own greedy text for rows 0 and 3 (hits), another text for rows 1 and 2 (misses)
    answers = [gen.texts[0], "A circle", "Blue", gen.texts[3]]
    batch = _batch(m, list(zip(QUESTIONS, IMAGES, answers)))
    m.model.train()
    try:
        ok = inference.exact_match_batch(m.model, m.processor, batch, max_new_tokens=4)
        assert m.model.training  # mode restored
    finally:
        m.model.eval()
    reencoded = [m.tokenizer.decode(m.tokenizer(" " + a, add_special_tokens=False)["input_ids"]).strip()
                 for a in answers]
    expect = [reencoded[0] == gen.texts[0], False, False, reencoded[3] == gen.texts[3]]
    assert ok == expect and ok[0] and ok[3]
    assert inference.rate_by_domain(ok, batch["domains"]) == {"general": (1, 3), "text": (1, 1)}


def test_oracle_export_needs_domains(tmp_path):
    base, path = make_tiny_export(tmp_path, routing="oracle")
    om = inference.load_for_inference(path)
    with pytest.raises(ValueError, match=r"routes by domain .*among \['general', 'text'\], got \['None'\]"):
        inference.generate(om, QUESTIONS[:1], IMAGES[:1], max_new_tokens=2)
    a = inference.generate(om, QUESTIONS[:2], IMAGES[:2], max_new_tokens=3, domains=["general", "text"],
                           routing=True)
    assert a.routing[0][:, 0].sum() > 0 and a.routing[0][:, 1:].sum() == 0  # domain 0 -> expert 0 only
    assert a.routing[1][:, 1].sum() > 0 and a.routing[1][:, [0, 2]].sum() == 0


def test_show_routing_under_sample_routing_gives_every_token_the_samples_experts(tiny, tmp_path, capsys):
    """tools/generate.py --show-routing of a routing_level 'sample' export: each layer decides once per sample,
    from the pooled prompt (the prompt step; cached-decoding steps reuse it and never call the router), and every
    generated token follows that decision. The table says so and shows the decision on every token's line: the
    expert a full forward over prompt + reply (prompt mask on the prompt) routes every token to, with the router
    probability of the pooled prompt; that forward's greedy tokens are the generated ones (batch 1: generate
    passes no attention mask, and the decoding steps must still be recognised as such)."""
    import importlib.util
    import re

    from mole_ds import MoLEConfig, mole_layers, routing_counts_by_sample, save_consolidated, set_prompt_mask
    from tests.support import ROOT

    tm = inference.load_for_inference(tiny[1])  # the token-level export's weights, re-exported at sample level
    cfg = MoLEConfig(**{**tm.config.to_dict(), "routing_level": "sample"})
    path = save_consolidated(tm.model, tmp_path / "sample" / "mole.safetensors", cfg,
                             extra={"base_model": str(tiny[0])})
    img = tmp_path / "red.png"
    IMAGES[0][0].save(img)
    spec = importlib.util.spec_from_file_location("_tool_generate", ROOT / "tools" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.main([str(path), "--prompt", QUESTIONS[0], "--image", str(img), "--max-new-tokens", "4",
                     "--show-routing"]) == 0
    out = capsys.readouterr().out
    assert "one decision per sample and MoLE layer" in out
    steps = [re.match(r"step\s+(\d+) token\s+(\d+) .*: (L0=e(\d)\((\d\.\d\d)\) L1=e(\d)\((\d\.\d\d)\))$", ln)
             for ln in out.splitlines() if ln.startswith("step")]
    assert len(steps) == 4 and all(steps), out  # a line for every generated token (was: an error after step 0)
    assert len({s[3] for s in steps}) == 1  # the same experts and probabilities on every line

    sm = inference.load_for_inference(path)
    assert sm.config.routing_level == "sample"
    p = inference.encode_prompt(sm, QUESTIONS[0], IMAGES[0])
    ids = torch.tensor([p.ids + [int(s[2]) for s in steps]])
    logits = {}
    hooks = [m.router.register_forward_hook(lambda mod, a, o, i=i: logits.setdefault(i, o))
             for i, m in enumerate(mole_layers(sm.model))]
    set_prompt_mask(sm.model, torch.arange(ids.shape[1])[None] < len(p.ids))
    try:
        with torch.no_grad():
            full = sm.model(input_ids=ids, pixel_values=p.pixel_values).logits
    finally:
        set_prompt_mask(sm.model, None)
        for h in hooks:
            h.remove()
    assert full[0, len(p.ids) - 1:-1].argmax(-1).tolist() == [int(s[2]) for s in steps]
    counts_LE = routing_counts_by_sample(sm.model)[:, 0]
    for layer, (e, prob) in enumerate(((steps[0][4], steps[0][5]), (steps[0][6], steps[0][7]))):
        assert counts_LE[layer].tolist() == [float(ids.shape[1]) if k == int(e) else 0.0 for k in range(3)]
        assert f"{float(logits[layer][0].softmax(-1).max()):.2f}" == prob


# -- errors: each names the path and the values ----------------------------------------------------------------
def test_missing_export(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: no such file or directory"):
        inference.load_for_inference(tmp_path / "nope", tiny[0])


def test_export_with_inconsistent_expert_count(tmp_path):
    _, path = make_tiny_export(tmp_path, num_experts=4, config_experts=2)
    with pytest.raises(ValueError, match=rf"export {path} holds 4 experts in .*experts\.\w+ \(shape \(4, .*\) but "
                                         r"its config says num_experts=2"):
        inference.load_for_inference(path)


def test_export_from_another_base(tmp_path, tiny):
    base3, _ = make_tiny_export(tmp_path / "three", num_layers=3)
    with pytest.raises(ValueError, match=rf"export {tiny[1]} has MoLE tensors for layers 0\.\.1 \(2 layers\); "
                                         rf"base model {base3} has 3 decoder layers"):
        inference.load_for_inference(tiny[1], base3)
    base32, _ = make_tiny_export(tmp_path / "narrow", hidden=32)
    with pytest.raises(ValueError, match=rf"export {tiny[1]} does not fit base model {base32}: .*experts\.\w+ has "
                                         r"shape \(3, \d+, \d+\), the model expects \(3, \d+, \d+\)"):
        inference.load_for_inference(tiny[1], base32)


def test_base_that_is_not_llava_or_llama(tmp_path, tiny):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(gpt2)
    with pytest.raises(ValueError, match=rf"base model {gpt2} is a 'gpt2' model \(GPT2LMHeadModel\); mole_ds runs "
                                         "LLaVA models with a Llama language model"):
        inference.load_for_inference(tiny[1], gpt2)
    with pytest.raises(ValueError, match=rf"base model {tmp_path} is not a local transformers model directory"):
        inference.load_for_inference(tiny[1], tmp_path)


def test_bad_chat_format_and_arguments(tiny, m):
    with pytest.raises(ValueError, match=r"chat_format \('chatml'\) must be one of"):
        inference.load_for_inference(tiny[1], chat_format="chatml")
    with pytest.raises(ValueError, match="2 questions, 1 image lists"):
        inference.generate(m, QUESTIONS[:2], IMAGES[:1])
    with pytest.raises(ValueError, match=r"continuation '' \(request 0\) has no tokens"):
        inference.loglikelihood(m, QUESTIONS[:1], [""], IMAGES[:1])


def test_chat_format_is_read_from_a_training_checkpoints_run_config():
    from mole_ds.inference import chat_format_of

    assert chat_format_of({"run_config": {"data": {"chat_format": "template"}}}) == "template"
    assert chat_format_of({"chat_format": "vicuna_v1", "run_config": {"data": {"chat_format": "template"}}}) == "vicuna_v1"
    assert chat_format_of({}) == "vicuna_v1"
