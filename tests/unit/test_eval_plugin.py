"""The lmms-eval plugin ``mole_llava``: the real lmms-eval CLI on the bundled local task against a tiny export.

Needs the ``eval`` extra (lmms-eval installed with --no-deps plus the extra's packages; see docs/eval.md).
One CLI run (module fixture) is checked several ways: its results JSON, its generations against
``tools/generate.py``'s, its multiple-choice answers against ``mole_ds.inference.loglikelihood``, and the
per-domain routing file against per-request counts computed here.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from mole_ds import inference
from mole_ds.eval import MODEL_NAME, TASKS_DIR
from tests.support import make_tiny_export

try:
    import lmms_eval  # noqa: F401
except ImportError as e:  # no skip: CI installs the extra, and a missing one must fail loudly
    raise ImportError("tests/unit/test_eval_plugin.py needs lmms-eval: pip install -e '.[eval]' && "
                      "pip install --no-deps lmms-eval==0.7.3") from e

ROOT = Path(__file__).resolve().parents[2]
TASK_DIR = TASKS_DIR / "mole_local"
DOCS = json.loads((TASK_DIR / "data.json").read_text())


def _task_utils():
    spec = importlib.util.spec_from_file_location("_mole_local_utils", TASK_DIR / "utils.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """(base, export dir, output dir, completed process) of one lmms-eval run on the group mole_local."""
    root = tmp_path_factory.mktemp("lmms")
    base, export = make_tiny_export(root)
    out = root / "out"
    exe = Path(sys.executable).parent / "lmms-eval"
    assert exe.is_file(), f"{exe}: the lmms-eval command is not installed beside {sys.executable}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(root / "hf"), "HF_DATASETS_CACHE": str(root / "hf" / "datasets"),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(exe), "--model", MODEL_NAME,
           "--model_args", f"pretrained={base},mole={export.parent},routing_out={out / 'routing.json'}",
           "--tasks", "mole_local", "--include_path", str(TASKS_DIR), "--batch_size", "4",
           "--output_path", str(out), "--log_samples"]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    return base, export.parent, out, r


@pytest.fixture(scope="module")
def m(cli_run):
    base, export, _, _ = cli_run
    return inference.load_for_inference(export, base)


def _one(out: Path, pattern: str) -> Path:
    hits = sorted(out.glob(f"*/{pattern}"))
    assert len(hits) == 1, f"{out}: expected one {pattern}, found {[str(h) for h in hits]}"
    return hits[0]


def _samples(out: Path, task: str) -> dict[int, dict]:
    lines = _one(out, f"*_samples_{task}.jsonl").read_text().splitlines()
    return {s["doc_id"]: s for s in map(json.loads, lines)}


def test_entry_point_registers_the_model():
    eps = [e for e in entry_points(group="lmms_eval.models") if e.name == MODEL_NAME]
    assert [e.value for e in eps] == ["mole_ds.eval.plugin:MANIFEST"], (
        "setup.py must declare entry_points={'lmms_eval.models': ['mole_llava = mole_ds.eval.plugin:MANIFEST']} "
        "and mole_ds be reinstalled (pip install -e .)")
    from lmms_eval.models import get_model

    from mole_ds.eval.mole_llava import MoLELlava

    assert get_model(MODEL_NAME) is MoLELlava


def test_cli_writes_results_json(cli_run):
    _, _, out, r = cli_run
    assert r.returncode == 0, f"lmms-eval failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    res = json.loads(_one(out, "*_results.json").read_text())
    vqa, mc = res["results"]["mole_local_vqa"], res["results"]["mole_local_mc"]
    assert 0.0 <= vqa["exact_match,none"] <= 1.0 and 0.0 <= mc["acc,none"] <= 1.0
    assert res["n-samples"]["mole_local_vqa"]["effective"] == len(DOCS)
    assert "mole_llava" in r.stdout and "exact_match" in r.stdout  # the summary table


def test_generations_equal_tools_generate(cli_run, capsys):
    """The plugin (batches of 4, through lmms-eval) answers every doc exactly as tools/generate.py does."""
    _, export, out, r = cli_run
    assert r.returncode == 0, r.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("_tool_generate", ROOT / "tools" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    samples = _samples(out, "mole_local_vqa")
    assert sorted(samples) == list(range(len(DOCS)))
    answers = []
    for i, doc in enumerate(DOCS):
        question = doc["conversations"][0]["value"].replace("<image>\n", "")
        argv = [str(export), "--prompt", question, "--max-new-tokens", "16"]
        if doc["image"]:
            argv += ["--image", str(TASK_DIR / doc["image"])]
        assert gen.main(argv) == 0
        line = capsys.readouterr().out.splitlines()[-1]
        assert line.startswith("ASSISTANT: ")
        answers.append(line[len("ASSISTANT: "):])
        assert samples[i]["filtered_resps"] == answers[-1], f"doc {i} ({doc['id']})"
    assert all(answers) and len(set(answers)) > 1


def test_multiple_choice_is_scored_by_loglikelihood(cli_run, m):
    """lmms-eval's acc equals the argmax of inference.loglikelihood over the choices; the plugin hands
    lmms-eval -log p (its argmin convention)."""
    _, _, out, r = cli_run
    assert r.returncode == 0, r.stderr[-3000:]
    utils = _task_utils()
    samples = _samples(out, "mole_local_mc")
    hits = 0
    for i, doc in enumerate(DOCS):
        choices = utils.doc_to_choice(doc)
        ims = utils.doc_to_visual(doc)
        s = inference.loglikelihood(m, [utils.doc_to_text(doc)] * len(choices), [" " + c for c in choices],
                                    [ims] * len(choices))
        pred = max(range(len(choices)), key=lambda k: s.logprobs[k])
        hits += pred == choices.index(utils.doc_to_target(doc))
        nll = [float(x[0]) for x in samples[i]["filtered_resps"]]
        assert nll == pytest.approx([-x for x in s.logprobs], abs=1e-3), f"doc {i}"
        assert samples[i]["acc"] == float(pred == choices.index(utils.doc_to_target(doc)))
    res = json.loads(_one(out, "*_results.json").read_text())
    assert res["results"]["mole_local_mc"]["acc,none"] == pytest.approx(hits / len(DOCS))


def test_routing_statistics_per_domain(cli_run, m):
    """routing.json = the per-request routing counts of every generation and every scored choice, by domain."""
    _, _, out, r = cli_run
    assert r.returncode == 0, r.stderr[-3000:]
    utils = _task_utils()
    stats = json.loads((out / "routing.json").read_text())
    assert stats["num_experts"] == 3 and stats["top_k"] == 1 and stats["layers"] == 2
    expect: dict[str, torch.Tensor] = {}
    requests: dict[str, int] = {}
    for doc in DOCS:
        ims, q = utils.doc_to_visual(doc), utils.doc_to_text(doc)
        choices = utils.doc_to_choice(doc)
        g = inference.generate(m, [q], [ims], max_new_tokens=16, routing=True).routing
        s = inference.loglikelihood(m, [q] * len(choices), [" " + c for c in choices], [ims] * len(choices),
                                    routing=True).routing
        d = doc["domain"]
        expect[d] = expect.get(d, torch.zeros(2, 3)) + sum(g + s)
        requests[d] = requests.get(d, 0) + 1 + len(choices)
    assert sorted(stats["domains"]) == sorted(expect) == ["general", "text"]
    for d, c in expect.items():
        got = stats["domains"][d]
        assert got["requests"] == requests[d]
        assert got["counts"] == c.long().tolist()
        assert got["tokens"] == int(c[0].sum())
        assert sum(got["fraction_mean"]) == pytest.approx(1.0, abs=1e-5)


def test_model_args_errors(tmp_path, cli_run):
    from mole_ds.eval.mole_llava import MoLELlava

    base, export, _, _ = cli_run
    with pytest.raises(ValueError, match="model_args needs mole="):
        MoLELlava(pretrained=str(base))
    with pytest.raises(ValueError, match=r"unknown model_args \['temprature'\]"):
        MoLELlava(mole=str(export), temprature="0")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'none'}: no such file or directory"):
        MoLELlava(mole=str(tmp_path / "none"), pretrained=str(base))
    with pytest.raises(ValueError, match=r"batch_size \('auto'\) and max_new_tokens \(256\) must be integers"):
        MoLELlava(mole=str(export), batch_size="auto")


def test_tasks_dir_command(capsys):
    from mole_ds.eval.__main__ import main

    assert main(["tasks-dir"]) == 0
    assert Path(capsys.readouterr().out.strip()) == TASKS_DIR
    assert (TASKS_DIR / "mole_local" / "mole_local.yaml").is_file()
    assert main([]) == 2
