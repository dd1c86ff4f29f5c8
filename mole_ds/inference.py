"""Inference with an exported MoLE model: the one library behind ``tools/generate.py``, the lmms-eval plugin
(``mole_ds.eval``) and the training loop's held-out exact match.

* :func:`load_for_inference` loads a local transformers base (LLaVA or Llama, offline), checks that the export
  fits it and restores the export with ``mole_ds.load_mole``; the chat format is the one recorded at training.
* :func:`generation_prompt` renders a question with the project's single prompt builder
  (``mole_ds.data.chat.build_prompt``), so evaluation sees exactly the training template.
* :func:`generate` is batched greedy decoding; :func:`loglikelihood` scores continuations; both can return
  per-sample routing counts (``mole_ds.routing_counts_by_sample`` after every forward).
* :func:`exact_match_batch` scores a collated training batch (``mole_ds.data.collate``) by greedy decoding
  from each sample's prompt tokens.

Algorithm of :func:`generate` (batched greedy decoding):
  1. render and tokenize each prompt exactly as the training data path does (:func:`encode_prompt`); order
     the requests by token length so a batch holds similar lengths;
  2. per batch: left-pad (the last prompt token of every row sits at the same position), images in prompt
     order; set oracle domain ids when the export routes by domain;
  3. ``model.generate`` greedy up to ``max_new_tokens``, stopping at eos (``synced_gpus`` when several ranks
     decode together, so every rank runs the same number of forwards: ZeRO-3 gathers and expert all-to-alls
     are collective);
  4. a forward hook keeps ``routing_counts_by_sample`` of every forward; row i fed its prompt (forward 0)
     and its generated tokens but the last (forwards 1..n_i-1), so its counts are the sum of forwards
     0..n_i-1 (later forwards only fed padding to a finished row);
  5. decode each row up to its stop token, cut at the first ``until`` string, restore the request order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from .config import MoLEConfig
from .data.chat import IMAGE_PLACEHOLDER, build_prompt, check_chat_format, tokenize_prompt
from .data.collate import image_expansion
from .export import load_mole, read_consolidated
from .mole.collect import routing_counts_by_sample
from .patching import PatchReport, find_language_model, mole_layers, set_sample_domains

DEFAULT_CHAT_FORMAT = "vicuna_v1"
SUPPORTED_MODEL_TYPES = {"llava": "LLaVA with a Llama language model", "llama": "Llama causal LM"}
_LAYER_RE = re.compile(r"layers\.(\d+)\.")


# -- loading --------------------------------------------------------------------------------------------------
def load_base(base: str | Path, dtype: torch.dtype = torch.float32):
    """(model, processor-or-tokenizer, is_llava) from a local transformers directory, offline, eval mode.

    Refuses (ValueError naming the path and the value) a directory without ``config.json``, a model that is
    neither LLaVA (with a Llama language model) nor Llama, and a directory without a processor/tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration

    base = Path(base)
    if not (base / "config.json").is_file():
        raise ValueError(f"base model {base} is not a local transformers model directory (no config.json)")
    cfg = AutoConfig.from_pretrained(base, local_files_only=True)
    text_type = getattr(getattr(cfg, "text_config", None), "model_type", None)
    if cfg.model_type not in SUPPORTED_MODEL_TYPES or (cfg.model_type == "llava" and text_type != "llama"):
        kind = f"{cfg.model_type!r}" + (f" with a {text_type!r} language model" if text_type else "")
        raise ValueError(f"base model {base} is a {kind} model ({', '.join(cfg.architectures or [])}); mole_ds "
                         "runs LLaVA models with a Llama language model (model_type 'llava') and Llama models "
                         "(model_type 'llama')")
    is_llava = cfg.model_type == "llava"
    cls = LlavaForConditionalGeneration if is_llava else AutoModelForCausalLM
    model = cls.from_pretrained(base, dtype=dtype, local_files_only=True).eval()
    try:
        processor = AutoProcessor.from_pretrained(base, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"base model {base} has no processor/tokenizer saved beside it: {e}") from e
    return model, processor, is_llava


def chat_format_of(extra: dict) -> str:
    """The chat format the export was trained with: ``extra["chat_format"]``, else the training run config's
    ``data.chat_format`` (recorded in every training checkpoint's consolidated file), else vicuna_v1."""
    run_data = ((extra.get("run_config") or {}).get("data") or {}) if isinstance(extra.get("run_config"), dict) else {}
    return extra.get("chat_format") or run_data.get("chat_format") or DEFAULT_CHAT_FORMAT


def check_export_fits_base(state: dict[str, torch.Tensor], cfg: MoLEConfig, model: nn.Module,
                           export: Path, base: Path | str) -> None:
    """Refuse an export that cannot be the base's (before anything is patched), naming both paths.

    1. every expert tensor holds ``cfg.num_experts`` experts on dim 0 (the file agrees with its own config);
    2. the export has MoLE tensors for exactly the base's decoder layers."""
    bad = [(n, tuple(t.shape)) for n, t in state.items() if ".mlp.experts." in n and t.shape[0] != cfg.num_experts]
    if bad:
        name, shape = bad[0]
        raise ValueError(f"export {export} holds {shape[0]} experts in {name} (shape {shape}) but its config says "
                         f"num_experts={cfg.num_experts}: the file is inconsistent")
    layers = sorted({int(m[1]) for n in state if ".mlp." in n and (m := _LAYER_RE.search(n))})
    n_base = len(find_language_model(model).layers)
    if layers != list(range(n_base)):
        have = f"layers {layers[0]}..{layers[-1]} ({len(layers)} layers)" if layers else "no decoder layer"
        raise ValueError(f"export {export} has MoLE tensors for {have}; base model {base} has {n_base} decoder "
                         "layers: the export was trained on another base model")


@dataclass
class InferenceModel:
    """A base model with a MoLE export restored, ready for :func:`generate` / :func:`loglikelihood`."""

    model: nn.Module
    processor: object
    """LlavaProcessor for LLaVA bases, the tokenizer for Llama bases."""
    is_llava: bool
    config: MoLEConfig
    extra: dict
    """The export's recorded metadata (base_model, step, domains, chat_format, ...)."""
    export: Path
    base: Path
    chat_format: str
    report: PatchReport

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def domain_ids(self, domains: Sequence[str | None] | None) -> torch.Tensor | None:
        """(B,) ids of ``domains`` in the export's training domain list, for ``routing: oracle`` exports."""
        if self.config.routing != "oracle":
            return None
        names = list(self.extra.get("domains") or [])
        missing = sorted({str(d) for d in (domains or [None]) if d not in names})
        if missing:
            raise ValueError(f"export {self.export} routes by domain (routing 'oracle'): every sample needs a "
                             f"domain among {names}, got {missing}")
        return torch.tensor([names.index(d) for d in domains], dtype=torch.long)


def load_for_inference(export: str | Path, base: str | Path | None = None, *, dtype: torch.dtype | str = "float32",
                       device: str | torch.device = "cpu", backend: str | None = None,
                       chat_format: str | None = None) -> InferenceModel:
    """Load ``base`` (default: the base_model recorded in the export) and restore ``export`` into it.

    ``export`` is a ``mole.safetensors``, a directory holding one or a training output_dir (newest complete
    checkpoint). ``chat_format`` overrides the one recorded in the export. Errors (FileNotFoundError /
    ValueError) name the path and the offending values."""
    from .peft_export import resolve_consolidated

    path = resolve_consolidated(export)
    state, cfg, extra = read_consolidated(path)
    base = base or extra.get("base_model")
    if not base:
        raise ValueError(f"export {path} records no base_model: give the base model directory")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model, processor, is_llava = load_base(base, dtype)
    check_export_fits_base(state, cfg, model, path, base)
    del state
    try:
        report = load_mole(path, model, backend=backend)
    except ValueError as e:
        raise ValueError(f"export {path} does not fit base model {base}: {e}") from e
    model.to(device).eval()
    fmt = chat_format or chat_format_of(extra)
    check_chat_format(fmt)
    return InferenceModel(model, processor, is_llava, cfg, extra, path, Path(base), fmt, report)


# -- prompts --------------------------------------------------------------------------------------------------
def user_turn(question: str, n_images: int) -> dict:
    """The LLaVA-style user turn: the question, with one "<image>" line per image in front unless it holds them."""
    if n_images and IMAGE_PLACEHOLDER not in question:
        question = "\n".join([IMAGE_PLACEHOLDER] * n_images + [question])
    return {"from": "human", "value": question}


def generation_prompt(question: str, n_images: int, chat_format: str, tokenizer,
                      image_expansion: str | None = None) -> str:
    """The training template up to where the assistant's reply starts (``mole_ds.data.chat.build_prompt``)."""
    return build_prompt([user_turn(question, n_images)], chat_format, tokenizer, image_expansion=image_expansion,
                        add_generation_prompt=True)


@dataclass
class EncodedPrompt:
    """One prompt as training tokenizes it: ``ids`` (bos + text, "<image>" expanded) and its images."""

    ids: list[int]
    pixel_values: torch.Tensor | None
    """(n_images, 3, H, W) from the processor's image processor, or None."""


def encode_prompt(m: InferenceModel, question: str, images: list, continuation: str = "") -> EncodedPrompt:
    """Render and tokenize exactly as the training data path does (``mole_ds.data.collate.SampleEncoder``):

    1. each image through ``processor.image_processor``; "<image>" expanded to the processor's N image tokens;
    2. text = :func:`generation_prompt` (+ ``continuation``); ids = ``mole_ds.data.chat.tokenize_prompt``
       (leading bos unless the text starts with it; the whole text tokenized at once, as training does)."""
    if images and not m.is_llava:
        raise ValueError(f"images given but the base model {m.base} is not a LLaVA model")
    pv, expansion = None, None
    if images:
        pv = torch.cat([m.processor.image_processor(images=im, return_tensors="pt")["pixel_values"] for im in images])
        expansion = image_expansion(m.processor, pv[0])
    text = generation_prompt(question, len(images), m.chat_format, m.tokenizer, expansion)
    return EncodedPrompt(tokenize_prompt(text + continuation, m.tokenizer), pv)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_batch(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of ``rows`` padded on ``side`` ("left" for generation, "right" to score)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def _model_inputs(m: InferenceModel, prompts: list[EncodedPrompt], rows: list[list[int]], side: str) -> dict:
    ids, mask = pad_batch(rows, _pad_id(m.tokenizer), side)
    out = {"input_ids": ids.to(m.device), "attention_mask": mask.to(m.device)}
    pvs = [p.pixel_values for p in prompts if p.pixel_values is not None]
    if pvs:  # images in prompt order: LLaVA scatters image features into the image tokens in order
        out["pixel_values"] = torch.cat(pvs).to(m.device, m.dtype)
    return out


# -- routing records ------------------------------------------------------------------------------------------
class ForwardRouting:
    """A forward hook on the whole model: ``routing_counts_by_sample`` (layers, B, E) after every forward."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.steps: list[torch.Tensor] = []
        self._handle = model.register_forward_hook(lambda mod, args, out: self.steps.append(
            routing_counts_by_sample(self.model).cpu()))

    def per_sample(self, forwards_BN: list[int]) -> list[torch.Tensor]:
        """(layers, E) counts per row: the sum of its first ``forwards_BN[i]`` forwards."""
        return [torch.stack(self.steps[:n]).sum(0)[:, i] for i, n in enumerate(forwards_BN)]

    def remove(self) -> None:
        self._handle.remove()


class RoutingRecorder:
    """Forward hooks on every MoLE router: per call, the top-k experts and probabilities of the last token
    (batch 1), for showing which experts produced each generated token."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = mole_layers(model)
        self.steps: list[dict[int, tuple[list[int], list[float]]]] = []
        self._handles = [m.router.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module, args, logits_TE):
            if i == 0:
                self.steps.append({})
            probs_E = logits_TE[-1].float().softmax(-1)  # batch 1: the last row is the last input position
            p_K, e_K = probs_E.topk(module.top_k)
            self.steps[-1][i] = (e_K.tolist(), p_K.tolist())
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


# -- generation -----------------------------------------------------------------------------------------------
def _synced() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def stop_ids(model: nn.Module, tokenizer) -> list[int]:
    """Token ids that end a reply: the tokenizer's eos and the model's generation_config eos (an int or a list,
    e.g. Llama-3's end-of-turn)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def greedy_ids(model: nn.Module, tokenizer, inputs: dict, max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation ids per row, each cut after its first stop id (kept) - steps 3 and 5 above."""
    stops = stop_ids(model, tokenizer)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         eos_token_id=stops, pad_token_id=_pad_id(tokenizer), synced_gpus=_synced())
    rows = out[:, inputs["input_ids"].shape[1]:].tolist()
    return [r[: next((k + 1 for k, t in enumerate(r) if t in stops), len(r))] for r in rows]


def cut_at(text: str, until: Sequence[str] | None) -> str:
    """``text`` up to the first occurrence of any stop string (lmms-eval's ``until``)."""
    for s in until or ():
        if s and s in text:
            text = text.split(s, 1)[0]
    return text


@dataclass
class Generation:
    """What :func:`generate` returns, in request order."""

    texts: list[str]
    token_ids: list[list[int]]
    """Generated ids per request, up to and including eos when one was produced."""
    routing: list[torch.Tensor] | None = None
    """Per request (layers, E) token counts over its prompt and generated tokens (``routing=True``)."""


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # longest first: memory errors show at once
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def generate(m: InferenceModel, questions: Sequence[str], images: Sequence[list] | None = None, *,
             max_new_tokens: int = 32, batch_size: int = 8, until: Sequence[str] | None = None,
             domains: Sequence[str | None] | None = None, routing: bool = False) -> Generation:
    """Greedy answers to ``questions`` (see the module docstring for the algorithm).

    images[i]: the PIL images of question i (LLaVA bases; ``[]`` for text only). domains[i]: its domain
    (required for ``routing: oracle`` exports). ``until``: stop strings cut from the decoded text."""
    n = len(questions)
    images = list(images) if images is not None else [[] for _ in range(n)]
    if len(images) != n or (domains is not None and len(domains) != n):
        raise ValueError(f"generate: {n} questions, {len(images)} image lists, "
                         f"{len(domains) if domains is not None else n} domains")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size ({batch_size}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    tok = m.tokenizer
    prompts = [encode_prompt(m, q, im) for q, im in zip(questions, images)]
    texts: list[str] = [""] * n
    ids: list[list[int]] = [[] for _ in range(n)]
    counts: list[torch.Tensor | None] = [None] * n
    for idx in _batches([len(p.ids) for p in prompts], batch_size):
        inputs = _model_inputs(m, [prompts[i] for i in idx], [prompts[i].ids for i in idx], "left")
        set_sample_domains(m.model, m.domain_ids([domains[i] for i in idx] if domains else None))
        rec = ForwardRouting(m.model) if routing else None
        try:
            rows = greedy_ids(m.model, tok, inputs, max_new_tokens)
        finally:
            set_sample_domains(m.model, None)
            if rec is not None:
                rec.remove()
        for i, row in zip(idx, rows):
            ids[i] = row
            texts[i] = cut_at(tok.decode(row, skip_special_tokens=True), until).strip()
        if rec is not None:
            for i, c in zip(idx, rec.per_sample([max(len(r), 1) for r in rows])):
                counts[i] = c
    return Generation(texts, ids, counts if routing else None)


# -- loglikelihood --------------------------------------------------------------------------------------------
@dataclass
class Scores:
    """What :func:`loglikelihood` returns, in request order."""

    logprobs: list[float]
    """Sum of log-probabilities of each continuation's tokens given its prompt."""
    greedy: list[bool]
    """Whether greedy decoding from the prompt would produce exactly the continuation's tokens."""
    routing: list[torch.Tensor] | None = None


@torch.no_grad()
def loglikelihood(m: InferenceModel, contexts: Sequence[str], continuations: Sequence[str],
                  images: Sequence[list] | None = None, *, batch_size: int = 8,
                  domains: Sequence[str | None] | None = None, routing: bool = False) -> Scores:
    """log p(continuation | prompt(context)) per request, the prompt being the training template up to the reply.

    1. prompt ids = :func:`encode_prompt` of the context; continuation ids = the ids of prompt + continuation
       tokenized at once (as training tokenizes prompt and reply) past the prompt's length;
    2. right-pad prompt + continuation per batch, one forward, log-softmax;
    3. sum the log-probabilities at the continuation positions; greedy = argmax equals every continuation token.
    """
    n = len(contexts)
    images = list(images) if images is not None else [[] for _ in range(n)]
    if len(continuations) != n or len(images) != n:
        raise ValueError(f"loglikelihood: {n} contexts, {len(continuations)} continuations, {len(images)} image lists")
    prompts = [encode_prompt(m, c, im) for c, im in zip(contexts, images)]
    wholes = [encode_prompt(m, c, im, cont).ids for c, im, cont in zip(contexts, images, continuations)]
    empty = [i for i, (p, w) in enumerate(zip(prompts, wholes)) if len(w) <= len(p.ids)]
    if empty:
        raise ValueError(f"loglikelihood: continuation {continuations[empty[0]]!r} (request {empty[0]}) has no tokens")
    logprobs, greedy = [0.0] * n, [False] * n
    counts: list[torch.Tensor | None] = [None] * n
    for idx in _batches([len(w) for w in wholes], batch_size):
        inputs = _model_inputs(m, [prompts[i] for i in idx], [wholes[i] for i in idx], "right")
        set_sample_domains(m.model, m.domain_ids([domains[i] for i in idx] if domains else None))
        try:
            logp_BTV = m.model(**inputs).logits.float().log_softmax(-1)
            per = routing_counts_by_sample(m.model).cpu() if routing else None
        finally:
            set_sample_domains(m.model, None)
        ids_BT = inputs["input_ids"]
        for j, i in enumerate(idx):
            pos = torch.arange(len(prompts[i].ids) - 1, len(wholes[i]) - 1, device=ids_BT.device)  # t predicts t+1
            target = ids_BT[j, pos + 1]
            logprobs[i] = float(logp_BTV[j, pos, target].sum())
            greedy[i] = bool((logp_BTV[j, pos].argmax(-1) == target).all())
            if per is not None:
                counts[i] = per[:, j]
    return Scores(logprobs, greedy, counts if routing else None)


# -- exact match on training batches --------------------------------------------------------------------------
def _normalise(text: str) -> str:
    from .studies.stats import normalise_answer

    return normalise_answer(text)


@torch.no_grad()
def exact_match_batch(model: nn.Module, processor, batch: dict, max_new_tokens: int = 16) -> list[bool]:
    """Per-sample exact match of greedy answers on a collated batch (``mole_ds.data.collate.collate``).

    The batch is already templated and tokenized as training saw it (with its chat format), so nothing is
    re-rendered: for each sample
      1. prompt = its tokens before the first supervised label; reference = the first supervised run (the
         first assistant reply and its eos);
      2. the prompts are left-padded into one batch (pixel_values as collated: image tokens lie in the prompts);
      3. greedy decoding up to ``max_new_tokens`` (``synced_gpus`` under several ranks: call it on every
         rank, with each rank's own batch);
      4. correct = the decoded answer equals the decoded reference after normalisation (lower case,
         punctuation and a leading article dropped).
    Use ``batch["domains"]`` for per-domain rates. The model's train/eval mode is restored afterwards."""
    tok = getattr(processor, "tokenizer", processor)
    ids_BT, labels_BT, mask_BT = batch["input_ids"], batch["labels"], batch["attention_mask"]
    B = ids_BT.shape[0]
    prompts, refs = [], []
    for i in range(B):
        sup = (labels_BT[i] != -100).nonzero().flatten().tolist()
        if not sup:
            raise ValueError(f"exact_match_batch: sample {i} (id {batch.get('ids', ['?'] * B)[i]}) has no "
                             "supervised tokens")
        s = sup[0]
        end = s
        while end < ids_BT.shape[1] and labels_BT[i, end] != -100 and mask_BT[i, end] == 1:
            end += 1
        prompts.append(ids_BT[i, :s].tolist())
        refs.append(ids_BT[i, s:end].tolist())
    device = next(model.parameters()).device
    in_BT, am_BT = pad_batch(prompts, _pad_id(tok), "left")
    inputs = {"input_ids": in_BT.to(device), "attention_mask": am_BT.to(device)}
    pv = batch.get("pixel_values")
    if pv is not None and pv.numel():
        inputs["pixel_values"] = pv.to(device, next(model.parameters()).dtype)
    was_training = model.training
    model.eval()
    try:
        rows = greedy_ids(model, tok, inputs, max_new_tokens)
    finally:
        model.train(was_training)
    return [_normalise(tok.decode(r, skip_special_tokens=True)) == _normalise(tok.decode(ref, skip_special_tokens=True))
            for r, ref in zip(rows, refs)]


def rate_by_domain(correct: Sequence[bool], domains: Sequence[str]) -> dict[str, tuple[int, int]]:
    """{domain: (correct, total)} - sum these over held-out batches (and ranks) before dividing."""
    out: dict[str, list[int]] = {}
    for ok, d in zip(correct, domains):
        c = out.setdefault(d, [0, 0])
        c[0] += int(ok)
        c[1] += 1
    return {d: (c, t) for d, (c, t) in out.items()}
