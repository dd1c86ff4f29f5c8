"""A transformers checkpoint directory as the base (``--model.path``) under ZeRO-3, on real DeepSpeed CPU ranks.

* Partitioned loading (mole_ds/train/model_loading.py ``load_partitioned``) against its slow reference,
  ``from_pretrained`` on one process: every parameter and buffer gathered back equals it exactly, in bf16 and
  fp32, for a bf16 LLaVA saved with llava-hf's key names and for a Llama with tied embeddings, while each
  rank holds only its partition.
* The product path: a tiny LLaVA saved with ``save_pretrained`` in bf16 with a locally built tokenizer (its own
  chat_template) and processor; ``deepspeed launchers/train.py --model.path ...`` under ZeRO-3 ep2 on 2 ranks
  trains, checkpoints; ``tools/export.py`` exports; ``tools/generate.py`` generates with the recorded chat format.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support import DEEPSPEED, DEMO_CONFIG, DS_CONFIG, PY, ROOT, free_port, make_demo_data, run, run_ranks

pytestmark = pytest.mark.dist

WORKER = Path(__file__).with_name("load_worker.py")


def tiny_processor():
    """A LlavaProcessor around a Llama-3-like byte-level tokenizer with its own chat_template (built locally)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from tests.unit.data.local_tokenizers import llama3_bytelevel

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=image_processor, tokenizer=llama3_bytelevel(), patch_size=8,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def save_tiny_llava(path: Path) -> None:
    """A tiny LLaVA (real transformers classes) saved in bf16 with its processor, as a hub checkpoint is."""
    from mole_ds.models.tiny import build_tiny_llava

    proc = tiny_processor()
    tok = proc.tokenizer
    model = build_tiny_llava(seed=3, dtype=torch.bfloat16, vocab_size=len(tok),
                             image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id,
                             hidden_size=48, intermediate_size=96, num_layers=2, initializer_range=48 ** -0.5)
    model.config.text_config.bos_token_id = tok.bos_token_id
    model.config.text_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    proc.save_pretrained(path)


def save_tied_llama(path: Path) -> None:
    """A tiny Llama whose lm_head is tied to its embeddings (the checkpoint stores the tensor once), fp32."""
    from mole_ds.models.tiny import build_tiny_llama

    model = build_tiny_llama(seed=4, vocab_size=96, hidden_size=40, intermediate_size=72, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_path")
    save_tiny_llava(root / "llava_bf16")
    save_tied_llama(root / "llama_tied")
    return root


# --- pieces that need no ranks -----------------------------------------------------------------------------

def test_checkpoint_is_bf16_with_llava_hf_keys(models):
    from safetensors import safe_open

    from mole_ds.train.model_loading import checkpoint_dtype, checkpoint_files

    d = models / "llava_bf16"
    assert checkpoint_dtype(d) == "bfloat16"
    files = checkpoint_files(d)
    with safe_open(str(files["language_model.lm_head.weight"]), framework="pt") as f:
        assert f.get_tensor("language_model.lm_head.weight").dtype == torch.bfloat16
    assert any(k.startswith("language_model.model.layers.") for k in files)  # legacy layout, renamed on load


def test_flat_range_reads_exactly_the_requested_elements(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mole_ds.train.model_loading import _flat_range

    g = torch.Generator().manual_seed(0)
    tensors = {"m": torch.randn(7, 5, generator=g), "v": torch.randn(11, generator=g),
               "c": torch.randn(3, 4, 6, generator=g), "s": torch.tensor(2.5)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        for k, t in tensors.items():
            flat, n = t.reshape(-1), t.numel()
            for world in (1, 2, 3, 4, 8):
                size = -(-n // world)
                for r in range(world):
                    s, e = r * size, min((r + 1) * size, n)
                    if e > s:
                        got = _flat_range(f.get_slice(k), list(t.shape), s, e)
                        assert torch.equal(got, flat[s:e]), (k, world, r)


def test_missing_safetensors_is_named(tmp_path):
    from mole_ds.train.model_loading import checkpoint_files

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no model.safetensors or model.safetensors.index.json.*pytorch_model.bin"):
        checkpoint_files(tmp_path)


# --- partitioned loading on 2 ranks vs from_pretrained ----------------------------------------------------

LOADS = [("llava_bf16", "bf16"), ("llava_bf16", "fp32"), ("llama_tied", "bf16")]


@pytest.fixture(scope="module")
def loaded(models, tmp_path_factory):
    """One 2-rank launch of load_worker.py that loads each of LOADS in turn: {(name, dtype): its --out}."""
    root = tmp_path_factory.mktemp("partitioned_load")
    outs = {job: root / f"{job[0]}_{job[1]}" for job in LOADS}
    args = [a for (name, dtype), out in outs.items() for a in ("--model", models / name, "--dtype", dtype, "--out", out)]
    run_ranks(2, [WORKER, *args], root / "load.log")
    return outs


@pytest.mark.parametrize("name,dtype", LOADS)
def test_partitioned_load_equals_from_pretrained(models, loaded, name, dtype):
    from transformers import AutoConfig

    from mole_ds.train.model_loading import _model_class

    out = loaded[(name, dtype)]
    tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    cfg = AutoConfig.from_pretrained(models / name)
    ref = _model_class(cfg).from_pretrained(models / name, dtype=tdtype)
    got = load_file(str(out / "gathered.safetensors"))
    ref_params = dict(ref.named_parameters())
    assert {k for k in got if not k.startswith("buffer:")} == set(ref_params)
    for k, p in ref_params.items():
        assert got[k].dtype == tdtype, k
        assert torch.equal(got[k], p.detach()), k
    for k, b in ref.named_buffers():
        torch.testing.assert_close(got[f"buffer:{k}"], b, rtol=0, atol=0, msg=k)
    # Each rank holds its partition only: ceil(numel / 2) of every tensor, and nothing whole.
    for r in (0, 1):
        rec = json.loads((out / f"rank{r}.json").read_text())
        assert rec["whole"] == [] and rec["dtype"] == str(tdtype)
        for k, p in ref_params.items():
            assert rec["held"][k] == math.ceil(p.numel() / 2), k
    if name == "llama_tied":
        assert "lm_head.weight" not in got  # one tensor, loaded once, still tied after loading


# --- the product path ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("model_path_run")
    data = make_demo_data(root / "data", train_per_domain=8, eval_per_domain=4, max_samples=8)
    out = root / "run"
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "launchers/train.py"), "--deepspeed", str(DS_CONFIG), "--config", str(DEMO_CONFIG),
           "--model.path", str(models / "llava_bf16"), "--data.chat_format", "template",
           "--data.train", str(data / "shards/train/manifest.json"),
           "--data.eval", str(data / "shards/eval/manifest.json"), "--data.num_workers", "0",
           "--train.output_dir", str(out), "--train.max_steps", "4", "--train.warmup_steps", "1",
           "--train.log_every", "1", "--train.eval_every", "4", "--checkpoint.every", "2"]
    res = run(cmd, root / "train.log")
    return {"root": root, "out": out, "stdout": res.stdout + res.stderr}


def test_train_with_model_path_zero3_ep2(trained, models):
    out = trained["out"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["zero_stage"] == 3 and summary["ep_size"] == 2
    losses = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in losses if r["kind"] == "train"]
    assert len(train) == 4 and all(math.isfinite(x) for x in train)
    tag = out / "checkpoints" / "step00000004"
    assert (tag / "mole_meta.json").is_file() and (tag / "mole.safetensors").is_file()
    assert not (out / "base_model").exists()  # a checkpoint base is not copied; the export points at it
    ckpt = load_file(str(tag / "mole.safetensors"))
    assert any(".experts." in k for k in ckpt) and any(".router." in k for k in ckpt)


def test_export_and_generate_with_the_recorded_chat_format(trained, models, tmp_path):
    exp = tmp_path / "export"
    run([str(PY), str(ROOT / "tools/export.py"), str(trained["out"]), "--out", str(exp), "--peft"],
        tmp_path / "export.log")
    meta = json.loads((exp / "mole_config.json").read_text())
    assert Path(meta["base_model"]).resolve() == (models / "llava_bf16").resolve()
    assert (exp / "peft" / "expert_0").is_dir()
    res = run([str(PY), str(ROOT / "tools/generate.py"), str(exp), "--prompt", "What is in the image?",
               "--max-new-tokens", "4"], tmp_path / "generate.log")
    assert "chat format template" in res.stderr
    assert res.stdout.strip().splitlines()[-1].startswith("ASSISTANT:")
