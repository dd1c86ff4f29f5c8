"""Launcher config errors are caught before any process group or model exists, naming key and value."""
import json

import pytest

from mole_ds.parallel import check_ep_size
from mole_ds.train.checkpoint import check_topology
from mole_ds.train.config import load_run_config
from mole_ds.train.engine import check_deepspeed_version
from mole_ds.train.launch import prepare

DS = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
      "zero_optimization": {"stage": 3}, "mole_ds": {"mole": {"num_experts": 4, "ep_size": 2}}}


def _prep(tmp_path, world, *overrides, ds=None):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ds or DS))
    return prepare(["--deepspeed", str(p), *overrides], world)


def _shards(tmp_path):
    """A local folder of shards (never read: the checks before start only list it)."""
    d = tmp_path / "shards"
    d.mkdir(exist_ok=True)
    (d / "general-000000.tar").write_bytes(b"")
    return str(d)


def test_valid_config_merges_deepspeed_file_then_overrides(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("mole:\n  num_experts: 8\ntrain:\n  max_steps: 20\n")
    cfg, ds = _prep(tmp_path, 4, "--config", str(run), "--train.lr", "1e-3", "--data.train", _shards(tmp_path))
    assert (cfg.mole.num_experts, cfg.mole.ep_size, cfg.train.max_steps, cfg.train.lr) == (8, 2, 20, 1e-3)
    assert "mole_ds" not in ds  # DeepSpeed never sees our key


@pytest.mark.parametrize("world,overrides,message", [
    (4, ["--mole.ep_size", "3", "--mole.num_experts", "6"], r"world size \(4\) must be divisible by mole.ep_size \(3\)"),
    (2, ["--mole.ep_size", "4"], r"mole.ep_size \(4\) must be <= world size \(2\)"),
    (4, ["--mole.num_experts", "6", "--mole.ep_size", "4"], r"mole.num_experts \(6\) must be divisible by mole.ep_size \(4\)"),
    (2, ["--mole.num_expert", "6"], r"unknown key\(s\) in section 'mole': num_expert"),
    (2, ["--train.max_steps", "ten"], r"train.max_steps \('ten'\) must be an integer"),
    (2, ["--optim.lr", "1"], r"unknown section 'optim'"),
    (2, ["--train.warmup_steps", "50", "--train.max_steps", "10"], r"train.warmup_steps \(50\) must be <= train.max_steps \(10\)"),
    (2, ["--checkpoint.resume", "/nonexistent/ckpt"], r"checkpoint.resume \('/nonexistent/ckpt'\) must be none, auto or"),
    (2, ["--train.max_steps", "0"], r"train.max_steps \(0\) must be >= 1"),
    (2, ["--train.log_every", "0"], r"train.log_every \(0\) must be >= 1"),
    (2, ["--train.lr", "-1e-4"], r"train.lr \(-0.0001\) must be > 0"),
    (2, ["--data.storage_timeout_s", "4000"], r"train.collective_timeout_s \(1800\) must exceed data.storage_timeout_s \(4000\)"),
    (2, ["--data.chat_format", "chatml"], r"data.chat_format \('chatml'\) must be one of vicuna_v1, template"),
    (4, ["--data.streams", "6"], r"data.streams \(6\) must be a multiple of the world size \(4\)"),
    (2, ["--data.streams", "6"], r"data.streams \(6\) must be a multiple of the global micro-batch \(4 = batch size 2 "
                                 r"x world size 2\)"),

    (2, ["--config", "/nonexistent/run.yaml"], r"--config \(/nonexistent/run.yaml\) does not exist"),
])
def test_config_errors(tmp_path, world, overrides, message):
    with pytest.raises(ValueError, match=message):
        _prep(tmp_path, world, *overrides)


def test_deepspeed_config_errors(tmp_path):
    bad = {**DS, "fp16": {"enabled": True}, "train_micro_batch_size_per_gpu": 0, "train_batch_size": 7,
           "zero_optimization": {"stage": 5}}
    with pytest.raises(ValueError) as err:
        _prep(tmp_path, 2, ds=bad)
    text = str(err.value)
    for msg in ("fp16.enabled (true) is not supported", "train_micro_batch_size_per_gpu (0) must be a positive integer",
                "zero_optimization.stage (5) must be 0, 1, 2 or 3"):
        assert msg in text
    with pytest.raises(ValueError, match=r"--deepspeed \(.*missing.json\) does not exist"):
        prepare(["--deepspeed", str(tmp_path / "missing.json")], 1)


@pytest.mark.parametrize("args,ds_extra,message", [
    (["--mole.ep_size", "4"], {}, "mole.ep_size (4) must be <= world size (1)"),
    (["--train.max_steps", "0"], {}, "train.max_steps (0) must be >= 1"),
    (["--train.log_every", "0"], {}, "train.log_every (0) must be >= 1"),
    (["--train.lr", "-0.001"], {}, "train.lr (-0.001) must be > 0"),
    (["--checkpoint.every", "-1"], {}, "checkpoint.every (-1) must be >= 0"),
    ([], {"zero_optimisation": {"stage": 3}}, "zero_optimisation ({'stage': 3}) is not a DeepSpeed key"),
    (["--config", "/nonexistent/run.yaml"], {}, "--config (/nonexistent/run.yaml) does not exist"),
    (["--data.train", "/nonexistent/manifest.json"], {}, "data.train ('/nonexistent/manifest.json') does not exist"),
])
def test_launcher_exits_2_with_message(tmp_path, capsys, args, ds_extra, message):
    """What launchers/train.py does with a bad configuration, before any process group exists."""
    from mole_ds.train.launch import main

    p = tmp_path / "ds.json"
    p.write_text(json.dumps({**DS, **ds_extra}))
    assert main(["--deepspeed", str(p), *args]) == 2
    assert message in capsys.readouterr().err


MAX_LENGTH_REFUSAL = (
    "invalid run configuration:\n"
    "  data.max_length (16) cannot hold one image sample: the image alone expands to 16 tokens, and with the "
    "shortest prompt and answer in chat_format 'vicuna_v1' it needs 69 tokens; set data.max_length to at least 69 "
    "(real samples need more: leave room for the question and the answer)")


def test_max_length_below_one_image_sample_is_refused_before_start(tmp_path, capsys):
    """The image-token count comes from the processor, built before the model (the embedded tiny one here:
    (32 / 8) ** 2 = 16 image tokens); the refusal is the launcher's one message, exit 2."""
    from mole_ds.train.launch import main

    with pytest.raises(ValueError) as err:
        _prep(tmp_path, 2, "--data.train", _shards(tmp_path), "--data.max_length", "16")
    assert str(err.value) == MAX_LENGTH_REFUSAL
    p = tmp_path / "ds.json"
    assert main(["--deepspeed", str(p), "--data.train", _shards(tmp_path), "--data.max_length", "16",
                 "--mole.ep_size", "1"]) == 2  # main's world size is WORLD_SIZE's (1 here)
    assert capsys.readouterr().err == f"error: {MAX_LENGTH_REFUSAL}\n"


def test_max_length_refusal_at_load_time_is_the_same_config_error():
    """A remote source is listed only by the loader: the same refusal, a ConfigError (the launcher exits 2)."""
    from mole_ds.config import ConfigError
    from mole_ds.data import DataConfig, check_max_length
    from mole_ds.data.manifest import ShardInfo
    from mole_ds.models.processor import build_tiny_processor

    with pytest.raises(ConfigError) as err:
        check_max_length(DataConfig(urls="s3://b/p/", max_length=16), build_tiny_processor(image_size=32, patch_size=8),
                         [ShardInfo("s3://b/p/general-000000.tar", "general")])
    assert str(err.value) == MAX_LENGTH_REFUSAL


def test_every_section_problem_and_data_rule_listed_at_once(tmp_path):
    with pytest.raises(ValueError) as err:
        _prep(tmp_path, 2, "--mole.num_experts", "0", "--train.max_steps", "ten", "--data.max_length", "4",
              "--data.samples_per_epoch", "10", "--data.domain_weights", "a=-1", "--model.path", str(tmp_path))
    text = str(err.value)
    for msg in ("mole.num_experts (0) must be >= 1", "train.max_steps ('ten') must be an integer"):
        assert msg in text
    with pytest.raises(ValueError) as err:
        _prep(tmp_path, 2, "--data.max_length", "4", "--data.num_workers", "-1", "--data.domain_weights", "a=-1",
              "--model.path", str(tmp_path))
    text = str(err.value)
    for msg in ("data.train ([]) must name at least one shard source", "data.max_length (4) must be >= 8",
                "data.num_workers (-1) must be >= 0", "data.domain_weights.a (-1.0) must be a number >= 0",
                f"model.path ({str(tmp_path)!r}) is not a local transformers model directory (no config.json)"):
        assert msg in text
    with pytest.raises(ValueError, match=r"data.samples_per_epoch \(10\) is only for mixing mode"):
        _prep(tmp_path, 2, "--data.train", _shards(tmp_path), "--data.samples_per_epoch", "10")


def test_help_lists_every_field_with_type_default_and_docstring(capsys):
    import dataclasses

    from mole_ds.train.config import SECTION_TYPES, field_docs
    from mole_ds.train.launch import parse_args

    with pytest.raises(SystemExit) as ex:
        parse_args(["--help"])
    assert ex.value.code == 0
    out = capsys.readouterr().out
    for section, cls in SECTION_TYPES.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert f"  --{section}.{f.name}  {f.type}  (default: {json.dumps(default)})\n" in out, (section, f.name)
            assert docs.get(f.name), f"{section}.{f.name} has no docstring"
            assert " ".join(docs[f.name].split())[:60] in " ".join(out.split()), (section, f.name)
    assert "--data.max_length  int  (default: 512)" in out and "--mole.ep_size  int | str  (default: 1)" in out


def test_version_range_and_ep_checks():
    with pytest.raises(RuntimeError, match=r"deepspeed 0.18.0 is outside the tested range >=0.19.3,<0.20.0"):
        check_deepspeed_version("0.18.0")
    with pytest.raises(RuntimeError, match="outside the tested range"):
        check_deepspeed_version("0.20.1")
    check_deepspeed_version("0.19.8")
    assert check_ep_size(2, 4) == []
    assert check_ep_size(8, 4) == ["mole.ep_size (8) must be <= world size (4)"]


def test_checkpoint_topology_check(tmp_path):
    meta = {"ep_size": 2, "world_size": 4, "num_experts": 8}
    check_topology(meta, 2, 4, 8, tmp_path)
    with pytest.raises(ValueError, match=r"written with ep_size 2 \(this run: 4\).*tools/export.py"):
        check_topology(meta, 4, 4, 8, tmp_path)


def test_run_config_types_from_yaml(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("data:\n  domain_weights: {general: 0.5, document: 0.5}\n  train: [a.tar, b.tar]\n")
    cfg = load_run_config(str(run))
    assert cfg.data.domain_weights == {"general": 0.5, "document": 0.5} and cfg.data.train == ["a.tar", "b.tar"]
    run.write_text("mole: [1, 2]\n")
    with pytest.raises(ValueError, match="section 'mole' in .* must be a mapping"):
        load_run_config(str(run))


def test_deepspeed_key_typo_is_refused_before_any_rank_starts(tmp_path):
    bad = {k: v for k, v in DS.items() if k != "zero_optimization"}
    bad["zero_optimisation"] = {"stage": 3}  # DeepSpeed itself would silently run ZeRO-0
    with pytest.raises(ValueError, match=r"zero_optimisation.*zero_optimization"):
        _prep(tmp_path, 2, ds=bad)
    bad = {**DS, "zero_optimization": {"stage": 3, "overlap_comms": True}}
    with pytest.raises(ValueError, match=r"zero_optimization.overlap_comms.*overlap_comm"):
        _prep(tmp_path, 2, ds=bad)


def test_invalid_yaml_names_the_file(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("train: {max_steps: [\n")
    with pytest.raises(ValueError, match=r"--config \(.*run.yaml\) is not valid YAML"):
        load_run_config(str(run))


def _fake_tag(root, step, meta_extra=None):
    """A checkpoint tag with the marker and manifest written as save_checkpoint writes them."""
    import json as _json

    from mole_ds.checkpoint import MARKER as META
    from mole_ds.checkpoint import file_manifest

    tag = root / f"step{step:08d}"
    (tag / "rng").mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 4)
    (tag / "rng" / "rank0.json").write_text("{}")
    (tag / "mole.safetensors").write_bytes(b"x" * 1000)
    (tag / META).write_text(_json.dumps({"step": step, "complete": True, "files": file_manifest(tag),
                                         **(meta_extra or {})}))
    return tag


def test_checkpoints_are_verified_and_resume_falls_back(tmp_path, capsys):
    from mole_ds.checkpoint import find_resume, verify_checkpoint

    old, new = _fake_tag(tmp_path, 2), _fake_tag(tmp_path, 4)
    assert verify_checkpoint(new) == [] and find_resume("auto", tmp_path) == new
    # Truncate the newest consolidated file: detected by size, resume falls back to the previous tag, loudly.
    (new / "mole.safetensors").write_bytes(b"x" * 10)
    problems = verify_checkpoint(new)
    assert len(problems) == 1 and "mole.safetensors: 10 bytes, the manifest says 1000" in problems[0]
    assert find_resume("auto", tmp_path) == old
    assert f"not using checkpoint {new}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fails verification"):
        find_resume(str(new), tmp_path)
    # Same size, other bytes: detected by the hash. A missing file is named.
    data = bytearray((old / "mp_rank_00_model_states.pt").read_bytes())
    data[100] ^= 0xFF
    (old / "mp_rank_00_model_states.pt").write_bytes(bytes(data))
    assert "SHA-256 differs" in verify_checkpoint(old)[0]
    (old / "rng" / "rank0.json").unlink()
    assert any("rank0.json: missing" in p for p in verify_checkpoint(old))
    assert find_resume("auto", tmp_path) is None


def test_metrics_are_truncated_after_the_resumed_step(tmp_path):
    from mole_ds.train.metrics import MetricsWriter

    m = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(1, 7):
        m.log(step, "train", {"loss": float(step)})
    m._f.write('{"step": 7, "kind": "tra')  # a half-written line of a killed run
    m.close()
    m = MetricsWriter(tmp_path, tensorboard=False)
    assert m.truncate_after(4) == 3
    m.log(5, "train", {"loss": 0.5})
    m.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_learning_rate_groups_and_checkpointing_are_checked_before_start(tmp_path):
    shards = _shards(tmp_path)
    with pytest.raises(ValueError) as err:
        _prep(tmp_path, 2, "--data.train", shards, "--train.projector_lr", "2e-5", "--train.router_lr", "-1")
    msg = str(err.value)
    assert "train.projector_lr (2e-05) needs mole.train_projector (false): the projector is frozen" in msg
    assert "train.router_lr (-1.0) must be a finite number >= 0 (0 = train.lr)" in msg
    cfg, _ = _prep(tmp_path, 2, "--data.train", shards, "--train.projector_lr", "2e-5", "--mole.train_projector",
                   "true", "--train.gradient_checkpointing", "true")
    assert cfg.train.projector_lr == 2e-5 and cfg.train.gradient_checkpointing is True


def test_param_groups_give_projector_and_router_their_own_rates():
    from mole_ds import MoLEConfig, patch_model
    from mole_ds.models.tiny import build_tiny_llava
    from mole_ds.train.engine import param_groups

    model = build_tiny_llava(seed=0)
    patch_model(model, MoLEConfig(num_experts=2, rank=2, train_projector=True))
    same = param_groups(model, 3, 1, 0.1, 2e-4)
    assert [g["name"] for g in same] == ["decay", "no_decay", "experts"]  # the layout of earlier checkpoints
    assert {g["lr"] for g in same} == {2e-4}
    own = param_groups(model, 3, 1, 0.1, 2e-4, projector_lr=2e-5, router_lr=1e-3)
    lrs = {g["name"]: g["lr"] for g in own}
    # no "no_decay" group left: the only 1-D tensors (biases) are the projector's and the routers'
    assert lrs == {"decay": 2e-4, "experts": 2e-4, "projector_decay": 2e-5,
                   "projector_no_decay": 2e-5, "router_decay": 1e-3, "router_no_decay": 1e-3}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in own:
        kinds = {("projector" if "multi_modal_projector" in names[id(p)] else "router" if ".router." in names[id(p)]
                  else "experts" if ".experts." in names[id(p)] else "base") for p in g["params"]}
        assert kinds == {g["name"].split("_")[0] if g["name"] not in ("decay", "no_decay") else "base"}
    assert sum(len(g["params"]) for g in own) == sum(len(g["params"]) for g in same)


def test_shipped_llava_recipe_loads_and_passes_every_check_but_the_model_path():
    """launchers/configs/llava_mole_7b.yaml + ds_configs/zero3_ep_bf16.json (docs/recipe.md) on 8 ranks: only
    the placeholder model.path is refused (no weights here); the settings are the recipe's."""
    from pathlib import Path

    from mole_ds.train.config import check_against_deepspeed, check_values
    from mole_ds.train.launch import read_deepspeed_file

    root = Path(__file__).resolve().parents[2]
    ds, ours = read_deepspeed_file(str(root / "ds_configs" / "zero3_ep_bf16.json"))
    cfg = load_run_config(str(root / "launchers" / "configs" / "llava_mole_7b.yaml"),
                          ["--data.train", "s3://bucket/llava665k/manifest.json"], base=ours)
    from mole_ds.train.ds_schema import check_deepspeed_keys

    assert check_deepspeed_keys(ds) == []  # every key is one DeepSpeed knows
    problems = check_values(cfg) + check_against_deepspeed(cfg, ds, 8)
    assert [p.split(" ")[0] for p in problems] == ["model.path"], problems
    assert (cfg.mole.num_experts, cfg.mole.rank, cfg.mole.ep_size, cfg.data.max_length) == (3, 32, "auto", 2048)
    assert (cfg.train.lr, cfg.train.projector_lr, cfg.train.gradient_checkpointing) == (2e-4, 2e-5, True)
    assert cfg.data.group_by_length == "modality" and ds["train_micro_batch_size_per_gpu"] * 8 == 128


def test_group_by_length_with_a_buffer_too_small_to_group_is_refused_before_start(tmp_path):
    with pytest.raises(ValueError) as err:
        _prep(tmp_path, 2, "--data.train", _shards(tmp_path), "--data.group_by_length", "modality",
              "--data.shuffle_buffer", "8", "--data.streams", "2")  # 2 samples per stream per step, 1 block of 8
    assert "data.shuffle_buffer (8) is too small for data.group_by_length ('modality')" in str(err.value)
    cfg, _ = _prep(tmp_path, 2, "--data.train", _shards(tmp_path), "--data.group_by_length", "modality",
                   "--data.shuffle_buffer", "16", "--data.streams", "2")
    assert cfg.data.group_by_length == "modality"
