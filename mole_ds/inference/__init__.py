"""Inference with an exported MoLE model: the one library behind ``tools/generate.py``, the lmms-eval plugin
(``mole_ds.eval``) and the training loop's held-out exact match. One small module per concern:

* :mod:`.loading`: :func:`load_for_inference` loads a local transformers base (LLaVA or Llama, offline),
  checks that the export fits it and restores the export with ``mole_ds.load_mole``; the chat format is the
  one recorded at training.
* :mod:`.prompts`: :func:`generation_prompt` renders a question with the project's single prompt builder
  (``mole_ds.data.chat.build_prompt``), so evaluation sees exactly the training template;
  :func:`encode_prompt` tokenizes it as training does; padding and batching.
* :mod:`.decoding`: :func:`generate` is batched greedy decoding (its algorithm is in that module).
* :mod:`.routing_hooks`: per-sample routing counts after every forward (``routing=True``) and the top-k
  experts of each generated token (``tools/generate.py --show-routing``).
* :mod:`.scoring`: :func:`loglikelihood` scores continuations; :func:`exact_match_batch` scores a collated
  training batch (``mole_ds.data.collate``) by greedy decoding from each sample's prompt tokens, with the
  answer metric of ``mole_ds.answers``.

Modules that need one concern import its module (training: ``mole_ds.inference.scoring``); the names below
are the package's public API for tools, the eval plugin and tests.
"""
from ..answers import rate_by_domain
from .decoding import Generation, cut_at, generate, greedy_ids, stop_ids
from .loading import (
    DEFAULT_CHAT_FORMAT,
    SUPPORTED_MODEL_TYPES,
    InferenceModel,
    chat_format_of,
    check_export_fits_base,
    load_base,
    load_for_inference,
    write_full_model,
)
from .prompts import EncodedPrompt, encode_prompt, generation_prompt, pad_batch, user_turn
from .routing_hooks import ForwardRouting, RoutingRecorder
from .scoring import Scores, exact_match_batch, loglikelihood

__all__ = [
    "DEFAULT_CHAT_FORMAT", "SUPPORTED_MODEL_TYPES", "EncodedPrompt", "ForwardRouting", "Generation",
    "InferenceModel", "RoutingRecorder", "Scores", "chat_format_of", "check_export_fits_base", "cut_at",
    "encode_prompt", "exact_match_batch", "generate", "generation_prompt", "greedy_ids", "load_base",
    "load_for_inference", "loglikelihood", "pad_batch", "rate_by_domain", "stop_ids", "user_turn",
    "write_full_model",
]
