"""Export tools: consolidated round trip, one PEFT adapter per expert, the export/generate CLIs, bad inputs."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mole_ds import MoLEConfig, mole_layers, patch_model
from mole_ds.checkpoint import find_resume, read_consolidated, resolve_consolidated, write_marker
from mole_ds.export import load_mole, save_consolidated
from mole_ds.peft_export import export_peft_adapters
from mole_ds.models.tiny import build_tiny_llava, image_seq_length

ROOT = Path(__file__).resolve().parents[2]
E = 3


def _randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero B's, a live router and a perturbed projector: every exported tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def _llava_inputs(model, batch: int = 2, text: int = 6, seed: int = 0) -> dict:
    """input_ids with one image's tokens in front of some text, plus pixel_values."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    n_img = image_seq_length(cfg)
    text_ids = torch.randint(5, cfg.image_token_id, (batch, text), generator=g)
    ids = torch.cat([text_ids[:, :1], torch.full((batch, n_img), cfg.image_token_id), text_ids[:, 1:]], 1)
    v = cfg.vision_config
    return {"input_ids": ids, "pixel_values": torch.randn(batch, 3, v.image_size, v.image_size, generator=g)}


def _force_expert(model, k: int) -> None:
    """Every token of every layer to expert k (router weight 0, one-hot bias)."""
    for layer in mole_layers(model):
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.bias.copy_(20.0 * torch.nn.functional.one_hot(torch.tensor(k), E).float())


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- (i) consolidated round trip ---------------------------------------------------------------------------
def test_consolidated_round_trip_gives_identical_logits(tmp_path):
    cfg = MoLEConfig(num_experts=E, rank=4, alpha=8.0, dropout=0.0, train_projector=True)
    trained = build_tiny_llava(seed=0)
    patch_model(trained, cfg)
    _randomize(trained)
    path = save_consolidated(trained, tmp_path / "mole.safetensors", cfg, extra={"base_model": "somewhere"})

    fresh = build_tiny_llava(seed=0)
    inputs = _llava_inputs(fresh)
    base_logits = fresh(**inputs).logits
    load_mole(path, fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, trained(**inputs).logits, rtol=0, atol=0)
    assert not torch.allclose(base_logits, fresh(**inputs).logits, atol=1e-3)  # the export is live
    _, cfg2, extra = read_consolidated(path)
    assert cfg2 == cfg and extra["base_model"] == "somewhere"


# -- (ii) PEFT adapter k == MoLE with every token routed to expert k ---------------------------------------
@pytest.fixture(scope="module")
def peft_export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("peft")
    cfg = MoLEConfig(num_experts=E, rank=4, alpha=8.0, dropout=0.0, routing="sparse", attn_lora=True,
                     train_projector=True)
    mole = build_tiny_llava(seed=0)
    patch_model(mole, cfg)
    _randomize(mole)
    path = save_consolidated(mole, tmp / "mole.safetensors", cfg, extra={"base_model": "tiny", "step": 7})
    dirs = export_peft_adapters(path, tmp / "peft")
    return mole, dirs


def test_peft_adapter_equals_mole_forced_to_that_expert(peft_export):
    from peft import PeftModel

    mole, dirs = peft_export
    assert [d.name for d in dirs] == [f"expert_{k}" for k in range(E)]
    inputs = _llava_inputs(mole)
    base = build_tiny_llava(seed=0)
    peft_logits = []
    with torch.no_grad():
        for d in dirs:
            pm = PeftModel.from_pretrained(copy.deepcopy(base), str(d)).eval()
            peft_logits.append(pm(**inputs).logits)
        for k in range(E):
            _force_expert(mole, k)
            ref = mole(**inputs).logits
            torch.testing.assert_close(peft_logits[k], ref, rtol=1e-5, atol=1e-5)
            for j in range(E):
                if j != k:  # a wrong expert must not match: the test can fail
                    assert (peft_logits[j] - ref).abs().max() > 1e-2, (j, k)


def test_peft_adapter_on_a_causal_lm(tmp_path):
    """LlamaForCausalLM: the decoder stack is model.layers (no language_model prefix)."""
    from peft import PeftModel

    from mole_ds.models.tiny import build_tiny_llama

    cfg = MoLEConfig(num_experts=E, rank=4, alpha=8.0, dropout=0.0)
    mole = build_tiny_llama(seed=2)
    patch_model(mole, cfg)
    _randomize(mole)
    dirs = export_peft_adapters(save_consolidated(mole, tmp_path / "m.safetensors", cfg), tmp_path / "peft")
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        pm = PeftModel.from_pretrained(build_tiny_llama(seed=2), str(dirs[1])).eval()
        _force_expert(mole, 1)
        torch.testing.assert_close(pm(input_ids=ids).logits, mole(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_peft_adapter_targets_language_model_only(peft_export):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    mole, dirs = peft_export
    pm = PeftModel.from_pretrained(build_tiny_llava(seed=0), str(dirs[0]))
    wrapped = [n for n, m in pm.named_modules() if isinstance(m, LoraLayer)]
    assert wrapped and not [n for n in wrapped if "vision_tower" in n]
    L = len(mole_layers(mole))
    assert len(wrapped) == L * 7  # gate/up/down + q/k/v/o per decoder layer
    # the trained projector travels in modules_to_save
    trained = dict(mole.named_parameters())["model.multi_modal_projector.linear_1.weight"]
    loaded = [p for n, p in pm.named_parameters() if "multi_modal_projector" in n and "modules_to_save" in n
              and n.endswith("linear_1.weight")]
    assert len(loaded) == 1 and torch.equal(loaded[0], trained)
    meta = json.loads((dirs[0] / "mole_expert.json").read_text())
    assert meta["expert"] == 0 and meta["equals_trained_model_where_router_chose_k"] is True
    assert "every token routed to expert 0 with weight 1" in (dirs[0] / "README.md").read_text()


def test_peft_readme_warns_for_weighted_routing(tmp_path):
    cfg = MoLEConfig(num_experts=2, rank=2, alpha=4.0, dropout=0.0, routing="weighted", attn_lora=False)
    m = build_tiny_llava(seed=0)
    patch_model(m, cfg)
    dirs = export_peft_adapters(save_consolidated(m, tmp_path / "m.safetensors", cfg), tmp_path / "peft")
    readme = (dirs[1] / "README.md").read_text()
    assert "WARNING" in readme and "routing='weighted'" in readme and "load_mole" in readme
    assert json.loads((dirs[1] / "mole_expert.json").read_text())["equals_trained_model_where_router_chose_k"] is False
    assert "self_attn" not in json.loads((dirs[1] / "adapter_config.json").read_text())["target_modules"]


# -- (iii) the CLIs on a tiny export -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run-like output_dir: base_model/ (weights + embedded processor) and checkpoints/step*/ tags."""
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    from mole_ds.models.processor import build_tiny_processor
    from mole_ds.models.tiny import tiny_llava_config

    run = tmp_path_factory.mktemp("run")
    proc = build_tiny_processor(image_size=32, patch_size=8)
    tok = proc.tokenizer
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(tiny_llava_config(
        vocab_size=len(tok), image_token_id=proc.image_token_id, pad_token_id=tok.pad_token_id)).eval()
    model.save_pretrained(run / "base_model")
    proc.save_pretrained(run / "base_model")
    cfg = MoLEConfig(num_experts=E, rank=4, alpha=8.0, dropout=0.0)
    patch_model(model, cfg)
    extra = {"base_model": str((run / "base_model").resolve()), "domains": ["a", "b"]}
    for step, complete in ((2, True), (4, True), (6, False)):  # step 6: crashed mid-save (no mole_meta.json)
        _randomize(model, seed=step)
        tag = run / "checkpoints" / f"step{step:08d}"
        save_consolidated(model, tag / "mole.safetensors", cfg, extra={**extra, "step": step})
        if complete:  # the marker as training writes it: last, with every file's size and SHA-256
            write_marker(tag, {"step": step})
    Image.new("RGB", (40, 30), (200, 30, 30)).save(run / "img.png")
    return run


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_resolve_picks_newest_complete_checkpoint(tiny_run):
    assert resolve_consolidated(tiny_run).parent.name == "step00000004"
    assert resolve_consolidated(tiny_run / "checkpoints").parent.name == "step00000004"
    tag = tiny_run / "checkpoints" / "step00000002"
    assert resolve_consolidated(tag) == tag / "mole.safetensors"
    assert resolve_consolidated(tag / "mole.safetensors") == tag / "mole.safetensors"


def test_damaged_newest_checkpoint_is_refused_or_skipped_by_every_reader(tiny_run, tmp_path, capsys):
    """The newest tag's mole.safetensors altered in place (same size, flipped bytes): resume, tools/export.py,
    tools/generate.py and the eval plugin each fall back to the previous verified tag saying why, and refuse
    the damaged tag (or its file) when it is named."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    bad = run / "checkpoints" / "step00000004"
    good = run / "checkpoints" / "step00000002"
    data = bytearray((bad / "mole.safetensors").read_bytes())
    size = len(data)
    for i in range(size - 64, size - 32):  # tensor bytes, not the header: the file still parses
        data[i] ^= 0xFF
    (bad / "mole.safetensors").write_bytes(bytes(data))
    assert (bad / "mole.safetensors").stat().st_size == size
    read_consolidated(bad / "mole.safetensors")  # still a readable file: only the manifest can tell

    def warned(err: str) -> bool:
        return f"not using checkpoint {bad}" in err and "SHA-256 differs" in err

    # resume (what the trainer calls): auto falls back loudly, a named tag is refused
    assert find_resume("auto", run / "checkpoints") == good
    assert warned(capsys.readouterr().err)
    with pytest.raises(ValueError, match="fails verification"):
        find_resume(str(bad), run / "checkpoints")

    # tools/export.py on the run: the previous tag, saying so; on the tag or its file: refused, exit 2
    export = _load_tool("export")
    assert export.main([str(run), "--out", str(tmp_path / "e")]) == 0
    out, err = capsys.readouterr()
    assert warned(err) and "step00000002" in out
    assert json.loads((tmp_path / "e" / "mole_config.json").read_text())["step"] == 2
    for named in (bad, bad / "mole.safetensors"):
        assert export.main([str(named), "--out", str(tmp_path / "e2")]) == 2
        assert "fails verification" in capsys.readouterr().err
    assert not (tmp_path / "e2").exists()

    # tools/generate.py (inference.load_for_inference): the same
    gen = _load_tool("generate")
    assert gen.main([str(run), "--prompt", "Hi", "--max-new-tokens", "1"]) == 0
    out, err = capsys.readouterr()
    assert warned(err) and f"loaded {good}" in err and out.startswith("ASSISTANT:")
    assert gen.main([str(bad), "--prompt", "Hi", "--max-new-tokens", "1"]) == 2
    assert "fails verification" in capsys.readouterr().err

    # the lmms-eval plugin (its model class, built as lmms-eval builds it)
    from mole_ds.eval.mole_llava import MoLELlava

    plugin = MoLELlava(mole=str(run), pretrained=str(run / "base_model"), device="cpu")
    assert plugin.m.export == good / "mole.safetensors"
    assert warned(capsys.readouterr().err)
    with pytest.raises(ValueError, match="fails verification"):
        MoLELlava(mole=str(bad), pretrained=str(run / "base_model"), device="cpu")


def test_export_cli_then_generate_cli(tiny_run, tmp_path):
    out = tmp_path / "export"
    r = _cli("tools/export.py", str(tiny_run), "--out", str(out), "--peft")
    assert r.returncode == 0, r.stderr
    assert "step00000004" in r.stdout and f"wrote {out / 'mole.safetensors'}" in r.stdout
    assert all(f"wrote {out / 'peft' / f'expert_{k}'}" in r.stdout for k in range(E))
    info = json.loads((out / "mole_config.json").read_text())
    assert info["step"] == 4 and info["mole_config"]["num_experts"] == E
    assert info["base_model"] == str((tiny_run / "base_model").resolve())
    for k in range(E):
        assert (out / "peft" / f"expert_{k}" / "adapter_model.safetensors").is_file()
    # the exported file restores the step-4 model
    from transformers import LlavaForConditionalGeneration

    a = LlavaForConditionalGeneration.from_pretrained(tiny_run / "base_model").eval()
    b = LlavaForConditionalGeneration.from_pretrained(tiny_run / "base_model").eval()
    load_mole(out / "mole.safetensors", a)
    load_mole(tiny_run / "checkpoints" / "step00000004" / "mole.safetensors", b)
    ids = torch.randint(5, 100, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=0, atol=0)

    n = 4
    r = _cli("tools/generate.py", str(out), "--prompt", "What is in the image?", "--image",
             str(tiny_run / "img.png"), "--max-new-tokens", str(n), "--show-routing")
    assert r.returncode == 0, r.stderr
    steps = [ln for ln in r.stdout.splitlines() if ln.startswith("step")]
    assert 1 <= len(steps) <= n
    for i, ln in enumerate(steps):
        m = re.match(r"step\s+(\d+) token\s+(\d+) .*: (.*)$", ln)
        assert m and int(m[1]) == i, ln
        assert re.fullmatch(r"L0=e\d\(\d\.\d\d\) L1=e\d\(\d\.\d\d\)", m[3]), ln  # one expert per layer
    assert r.stdout.splitlines()[-1].startswith("ASSISTANT:")



def test_generate_text_only_prompt(tiny_run, capsys):
    gen = _load_tool("generate")  # in process: the subprocess run above already covers the command line
    assert gen.main([str(tiny_run), "--prompt", "Explain why the sky is blue.", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("ASSISTANT:") and "step" not in out


def test_generate_routing_matches_a_manual_forward(tiny_run):
    """Step 0 of --show-routing is the routing of the prompt's last position, and its token the argmax."""
    from transformers import AutoProcessor

    gen = _load_tool("generate")
    path = resolve_consolidated(tiny_run)
    model, proc, is_llava = gen.load_base(tiny_run / "base_model", torch.float32)
    assert is_llava
    load_mole(path, model)
    text = gen.render_generation_prompt("Hi there", has_image=False)
    assert text.endswith("USER: Hi there ASSISTANT:") and text.startswith("A chat between")
    ids = proc.tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == proc.tokenizer.bos_token_id
    rec = gen.RoutingRecorder(model)
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=2, do_sample=False,
                             pad_token_id=proc.tokenizer.pad_token_id)
        rec.remove()
        logits = model(input_ids=ids).logits
    assert out[0, ids.shape[1]].item() == logits[0, -1].argmax().item()
    for i, layer in enumerate(mole_layers(model)):
        x = {}
        h = layer.router.register_forward_hook(lambda m, a, o: x.setdefault("logits", o))
        with torch.no_grad():
            model(input_ids=ids)
        h.remove()
        assert rec.steps[0][i][0] == [x["logits"][-1].argmax().item()]
    assert len(rec.steps) == out.shape[1] - ids.shape[1]


# -- (iv) bad inputs ---------------------------------------------------------------------------------------
def test_export_cli_errors_name_the_path(tmp_path, capsys):
    export = _load_tool("export")
    missing = tmp_path / "nope"
    assert export.main([str(missing), "--out", str(tmp_path / "o")]) == 2
    assert f"{missing}: no such file or directory" in capsys.readouterr().err

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    assert export.main([str(foreign), "--out", str(tmp_path / "o")]) == 2
    assert f"{foreign} is not a mole_ds consolidated export" in capsys.readouterr().err

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage")
    assert export.main([str(corrupt), "--out", str(tmp_path / "o")]) == 2
    assert str(corrupt) in capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    assert export.main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'empty'} holds no mole.safetensors" in capsys.readouterr().err

    text = tmp_path / "notes.txt"
    text.write_text("hi")
    assert export.main([str(text), "--out", str(tmp_path / "o")]) == 2
    assert f"{text} is not a .safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "o" / "mole.safetensors").exists()  # nothing written on error

    incomplete = tmp_path / "run" / "checkpoints" / "step00000001"
    incomplete.mkdir(parents=True)
    assert export.main([str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_generate_cli_errors_name_the_path(tiny_run, tmp_path, capsys):
    gen = _load_tool("generate")
    export = tiny_run / "checkpoints" / "step00000002"
    assert gen.main([str(export), "--prompt", "x", "--base", str(tmp_path)]) == 2
    assert f"base model {tmp_path} is not a local transformers model directory" in capsys.readouterr().err
    assert gen.main([str(tmp_path / "none.safetensors"), "--prompt", "x"]) == 2
    assert f"{tmp_path / 'none.safetensors'}: no such file" in capsys.readouterr().err
    assert gen.main([str(export), "--prompt", "x", "--image", str(tmp_path / "missing.png")]) == 2
    assert f"--image {tmp_path / 'missing.png'}: no such file" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage")
    assert gen.main([str(corrupt), "--prompt", "x"]) == 2
    assert f"cannot read {corrupt}" in capsys.readouterr().err
