"""``mole_llava``: an lmms-eval model that runs a base model with an exported MoLE.

    lmms-eval --model mole_llava --model_args pretrained=BASE_DIR,mole=EXPORT[,KEY=VALUE...] --tasks TASK

model_args (all optional but ``mole``):
  pretrained      base model directory (local transformers LLaVA/Llama + processor); default: the base_model
                  recorded in the export
  mole            the export: ``mole.safetensors``, a directory holding one, or a training output_dir
  device, dtype   default cuda when available else cpu; float32 (bfloat16 on GPU for real models)
  batch_size      requests per forward (lmms-eval's ``--batch_size`` sets it too)
  chat_format     override the chat format recorded in the export (vicuna_v1 | template)
  backend         MoLE dispatch backend (default: the export's)
  max_new_tokens  default generation length when a task sets none (256)
  routing_out     write per-domain routing statistics of the evaluated samples to this JSON file (put it
                  in lmms-eval's --output_path to keep it next to the results)

Requests go through :mod:`mole_ds.inference` (the library behind ``tools/generate.py``), so a prompt is
rendered with the training template and greedy answers equal ``tools/generate.py``'s.

Algorithm of ``generate_until`` / ``loglikelihood``:
  1. per request, fetch its doc (``self.task_dict[task][split][doc_id]``), its images (``doc_to_visual``) and
     its domain (the doc's ``domain`` field, else the task name);
  2. group generation requests by their generation settings (until, max_new_tokens); greedy only: sampling
     settings are reported once and ignored;
  3. call ``inference.generate`` / ``inference.loglikelihood`` on each group (batched, length-sorted);
     loglikelihood answers ``(-log p(continuation | prompt), greedy)``: lmms-eval's multiple-choice scoring
     takes the argmin, i.e. it expects a loss, as its built-in models return;
  4. add each request's routing counts to its domain and rewrite ``routing_out``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from loguru import logger

from ._compat import alias_filelock_api

alias_filelock_api()  # before lmms-eval's evaluator needs it (the model class is imported first)

from lmms_eval.api.instance import GenerationResult, Instance  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402

from .. import inference  # noqa: E402
from .routing import DomainRouting  # noqa: E402

_IGNORED_GEN_KWARGS = ("temperature", "top_p", "top_k", "num_beams", "do_sample")


class MoLELlava(lmms):
    """lmms-eval model ``mole_llava`` (see the module docstring for the arguments)."""

    is_simple = True

    def __init__(self, mole: str | None = None, pretrained: str | None = None, device: str | None = None,
                 dtype: str = "float32", batch_size: int | str = 1, chat_format: str | None = None,
                 backend: str | None = None, max_new_tokens: int | str = 256, routing_out: str | None = None,
                 max_batch_size: int | None = None, **unknown) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"mole_llava: unknown model_args {sorted(unknown)} (known: pretrained, mole, device, "
                             "dtype, batch_size, chat_format, backend, max_new_tokens, routing_out)")
        if not mole:
            raise ValueError("mole_llava: model_args needs mole=<mole.safetensors, export directory or training "
                             "output_dir>")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"mole_llava: dtype {dtype!r} must be float32, bfloat16 or float16")
        try:
            self.batch_size_per_gpu = int(batch_size)
            self.max_new_tokens = int(max_new_tokens)
        except ValueError as e:
            raise ValueError(f"mole_llava: batch_size ({batch_size!r}) and max_new_tokens ({max_new_tokens!r}) "
                             "must be integers") from e
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.m = inference.load_for_inference(mole, pretrained, dtype=dtype, device=device, backend=backend,
                                              chat_format=chat_format)
        self._device = torch.device(device)
        self.routing_out = Path(routing_out) if routing_out else None
        self.routing = DomainRouting(self.m.config.num_experts, self.m.config.top_k)
        self._warned: set[str] = set()
        logger.info(f"mole_llava: {self.m.export} on {self.m.base}: {self.m.report.layers} MoLE layers x "
                    f"{self.m.config.num_experts} experts, routing {self.m.config.routing}, chat format "
                    f"{self.m.chat_format}")

    # lmms-eval reads these
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def model(self):
        return self.m.model

    @property
    def tokenizer(self):
        return self.m.tokenizer

    # step 1
    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual, doc: dict, where: str) -> list:
        if doc_to_visual is None:
            return []
        raw = doc_to_visual(doc) or []
        out = []
        for v in raw if isinstance(raw, (list, tuple)) else [raw]:
            if not hasattr(v, "convert"):
                raise ValueError(f"mole_llava: {where} gives a {type(v).__name__} visual; only images (PIL) are "
                                 "supported (no video or audio)")
            out.append(v.convert("RGB"))
        if out and not self.m.is_llava:
            raise ValueError(f"mole_llava: {where} has images but the base model {self.m.base} is not a LLaVA model")
        return out

    @staticmethod
    def _domain(doc: dict, task: str) -> str:
        d = doc.get("domain") if isinstance(doc, dict) else None
        return str(d) if d is not None else task

    def _oracle_domains(self, docs: list[dict]) -> list[str | None] | None:
        if self.m.config.routing != "oracle":
            return None
        return [d.get("domain") if isinstance(d, dict) else None for d in docs]

    def _record(self, domains: list[str], counts) -> None:
        if counts is None:
            return
        for d, c in zip(domains, counts):
            self.routing.add(d, c)
        if self.routing_out is not None:
            self.routing.write(self.routing_out)

    def _settings(self, gen_kwargs: dict) -> tuple[tuple[str, ...], int]:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = (until,) if isinstance(until, str) else tuple(until or ())
        max_new = int(kw.pop("max_new_tokens", self.max_new_tokens))
        sampling = {k: kw[k] for k in _IGNORED_GEN_KWARGS if k in kw and kw[k] not in (0, 0.0, 1, None, False)}
        key = json.dumps(sampling, sort_keys=True, default=str)
        if sampling and key not in self._warned:
            self._warned.add(key)
            logger.warning(f"mole_llava decodes greedily: generation settings {sampling} are ignored")
        return until, max_new

    def generate_until(self, requests: list[Instance]) -> list[str]:
        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, r in enumerate(requests):
            settings.append(self._settings(r.args[1]))
            groups.setdefault(settings[-1], []).append(i)
        out: list[str] = [""] * len(requests)
        for (until, max_new), idx in groups.items():  # step 2
            questions, images, domains, docs = [], [], [], []
            for i in idx:
                context, _, doc_to_visual, doc_id, task, split = requests[i].args
                doc = self._doc(task, split, doc_id)
                docs.append(doc)
                questions.append(context)
                images.append(self._visuals(doc_to_visual, doc, f"task {task} doc {doc_id}"))
                domains.append(self._domain(doc, task))
            gen = inference.generate(self.m, questions, images, max_new_tokens=max_new,  # step 3
                                     batch_size=self.batch_size, until=until,
                                     domains=self._oracle_domains(docs), routing=True)
            for i, text in zip(idx, gen.texts):
                out[i] = text
            self._record(domains, gen.routing)  # step 4
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        contexts, conts, images, domains, docs = [], [], [], [], []
        for r in requests:
            if len(r.args) == 2:  # unconditional continuation (acc_mutual_info): no doc, no image
                context, cont = r.args
                doc, task, vis = {}, r.task_name, []
            else:
                context, target, doc_to_visual, doc_id, task, split = r.args
                doc = self._doc(task, split, doc_id)
                cont = target if isinstance(target, str) else str(target(doc))
                vis = self._visuals(doc_to_visual, doc, f"task {task} doc {doc_id}")
            contexts.append(context)
            conts.append(cont)
            images.append(vis)
            docs.append(doc)
            domains.append(self._domain(doc, task))
        scores = inference.loglikelihood(self.m, contexts, conts, images, batch_size=self.batch_size,
                                         domains=self._oracle_domains(docs), routing=True)
        self._record(domains, scores.routing)
        # lmms-eval 0.7.3 scores multiple choice with argmin: it expects a loss, as its own models return.
        # Its evaluator turns every answer that is not a str or a GenerationResult into str(answer), which
        # breaks a (float, bool) pair; GenerationResult.text is passed through unchanged, so the pair rides in it.
        return [GenerationResult((-lp, g)) for lp, g in zip(scores.logprobs, scores.greedy)]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("mole_llava does not run multi-round generation tasks (generate_until_multi_round)")
