"""Build the base model (and its processor) a run trains: the embedded tiny LLaVA, or a local transformers
checkpoint directory, in the run's precision.

Under ZeRO-3 a checkpoint is built and loaded partitioned (:func:`load_partitioned`): every rank constructs
the model inside ``deepspeed.zero.Init`` (each module's tensors are partitioned as soon as the module exists)
and then copies, straight from the safetensors files, only the flat range of each tensor that its partition
holds. No rank ever holds the whole model, so peak host memory at load is about model bytes / world plus the
largest single module (the bounded overhead of zero.Init's construction)."""
from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import math
from pathlib import Path

import torch

from ..parallel.deepspeed_compat import is_partitioned
from .config import ModelSection

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


def ds_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def model_dtype(section: ModelSection, ds: dict) -> torch.dtype:
    """The dtype the base is built and loaded in: the training precision (DeepSpeed keeps every parameter in
    it). ``model.dtype: auto`` follows the DeepSpeed config's bf16 switch; a bf16 checkpoint trained in fp32 is
    upcast, an fp32 one trained in bf16 is cast down. Router math is fp32 whatever this is (mole/router.py)."""
    if section.dtype == "bf16" or (section.dtype == "auto" and ds.get("bf16", {}).get("enabled")):
        return torch.bfloat16
    return torch.float32


def checkpoint_dtype(path: str | Path) -> str | None:
    """The dtype a checkpoint directory says it was saved in (config.json ``dtype``/``torch_dtype``), if any."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("dtype") or cfg.get("torch_dtype")


def _model_class(cfg):
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration if cfg.model_type == "llava" else AutoModelForCausalLM


def build_processor(section: ModelSection):
    """The processor of the model a run trains (tokenizer + image processor; no weights): the checkpoint
    directory's own, or the embedded tiny one. Cheap enough for the launcher's checks before start."""
    if section.path:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(section.path, local_files_only=True)
    from ..models.processor import build_tiny_processor

    return build_tiny_processor(image_size=32, patch_size=8)


def build_model(section: ModelSection, ds: dict, seed: int = 0, partitioned: bool | None = None):
    """(model, processor). An empty ``section.path`` builds the embedded tiny LLaVA locally.

    A checkpoint directory is loaded partitioned under ZeRO-3 (:func:`load_partitioned`) and whole otherwise.
    ``partitioned=False`` forces the whole load under ZeRO-3 too (every rank builds the full model and
    ``deepspeed.initialize`` partitions it afterwards: the slow reference, kept for benchmarks and parity
    tests). The tiny embedded model is always built whole and partitioned by ``deepspeed.initialize``."""
    from transformers import LlavaForConditionalGeneration

    dtype = model_dtype(section, ds)
    zero3 = ds_stage(ds) == 3
    torch.manual_seed(seed)
    if section.path:
        path = Path(section.path)
        if not (path / "config.json").is_file():
            raise ValueError(f"model.path ({section.path!r}) is not a local transformers model directory "
                             "(no config.json); nothing is downloaded")
        model = load_base(path, ds, dtype, partitioned=zero3 and partitioned is not False)
        return model, build_processor(section)

    from ..models.tiny import tiny_llava_config

    processor = build_processor(section)
    tok = processor.tokenizer
    # initializer_range 1/sqrt(hidden), not transformers' 0.02: the frozen lm_head sits behind an RMSNorm of
    # weight 1, so at 0.02 its logits can never exceed ~0.16 sqrt(hidden) and no adapter could make the
    # model confident (answer loss stalls near 6 nats). Pretrained heads are not capped like that.
    cfg = tiny_llava_config(vocab_size=len(tok), image_token_id=processor.image_token_id,
                            pad_token_id=tok.pad_token_id, hidden_size=section.tiny_hidden,
                            intermediate_size=2 * section.tiny_hidden, num_layers=section.tiny_layers,
                            initializer_range=section.tiny_hidden ** -0.5)
    # Built whole (it is tiny); deepspeed.initialize partitions it under ZeRO-3.
    model = LlavaForConditionalGeneration(cfg).to(dtype)
    return model, processor


@contextlib.contextmanager
def freed_memory_returned():
    """While loading, large blocks are mmapped, so what is freed goes back to the system at once (glibc only).

    Under ``zero.Init`` every module is built whole, then partitioned and its full tensors freed. glibc's
    malloc raises its mmap threshold dynamically after such frees (up to 32 MiB), so later blocks of that size
    come from the heap, where freed memory stays resident (measured: +90 MiB on one of 2 ranks for the 254M
    stand-in of tools/bench_load.py, docs/loading.md). A fixed 1 MiB threshold during loading avoids it;
    afterwards the threshold is set to 32 MiB, the value the dynamic rule converges to, and the heap trimmed.
    Elsewhere than glibc this is a no-op."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield
        return
    M_MMAP_THRESHOLD = -3
    mallopt(M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
        trim(0)


def load_base(path: str | Path, ds: dict, dtype: torch.dtype, partitioned: bool):
    """The base model of a checkpoint directory in ``dtype``: partitioned (ZeRO-3, :func:`load_partitioned`,
    with :func:`freed_memory_returned`) or whole on this process (``from_pretrained``)."""
    if partitioned:
        with freed_memory_returned():
            return load_partitioned(path, ds, dtype)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    return _model_class(cfg).from_pretrained(path, dtype=dtype, local_files_only=True)


def cast_unpartitioned(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating parameter that ZeRO-3 has not partitioned yet (all of them for a model built whole;
    the MoLE/LoRA tensors added by patching for a partitioned one) to ``dtype``. Partitioned tensors are
    already in the dtype zero.Init gave them, and DeepSpeed does not cast a zero.Init model itself."""
    for p in model.parameters():
        if not is_partitioned(p) and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


# ---------------------------------------------------------------------------------------------------------
# Partitioned loading


def checkpoint_files(path: Path) -> dict[str, Path]:
    """{checkpoint key: safetensors file} of a transformers checkpoint directory (sharded or single)."""
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: path / f for k, f in weight_map.items()}
    single = path / SAFETENSORS_SINGLE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    found = sorted(p.name for p in path.iterdir())
    raise ValueError(f"model.path ({str(path)!r}) has no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} "
                     f"(found {found}); partitioned loading reads safetensors only (re-save the model with "
                     "save_pretrained(..., safe_serialization=True))")


def checkpoint_key_map(model, keys) -> dict[str, str]:
    """{model state-dict name: checkpoint key}, with transformers' own renamings for this model class applied
    to the checkpoint keys (e.g. llava-hf's ``language_model.model.layers...`` -> ``model.language_model...``),
    as ``from_pretrained`` does."""
    names = {n: None for n, _ in model.named_parameters(remove_duplicate=False)}
    names.update({n: None for n, _ in model.named_buffers()})
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
    except ImportError:  # an older transformers: keys are taken as they are
        transforms, WeightRenaming, rename_source_key = [], None, None
    renamings = [t for t in transforms if WeightRenaming is not None and isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if WeightRenaming is None or not isinstance(t, WeightRenaming)]
    prefix = getattr(model, "base_model_prefix", None) or None
    out: dict[str, str] = {}
    for key in keys:
        if key in names:
            out[key] = key
            continue
        if rename_source_key is None:
            continue
        new, converter = rename_source_key(key, renamings, converters, prefix, names)
        if converter is not None:
            raise ValueError(f"checkpoint key {key!r} needs a weight conversion ({converter!r}), not a rename; "
                             "partitioned loading copies tensors as saved: re-save the model with this "
                             "transformers version's save_pretrained first")
        if new in names:
            out[new] = key
    return out


def _flat_range(sl, shape: list[int], start: int, end: int) -> torch.Tensor:
    """Elements [start, end) of a row-major tensor, read from a safetensors slice without reading the rest:
    the rows that cover the range are read, flattened and cut."""
    if not shape:
        return sl[...].reshape(1)[start:end]
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    r0, r1 = start // row, -(-end // row)
    rows = sl[r0:r1]
    return rows.reshape(-1)[start - r0 * row:end - r0 * row]


def load_partitioned(path: str | Path, ds: dict, dtype: torch.dtype):
    """Build a transformers model from ``path`` partitioned under ZeRO-3 and fill this rank's partitions.

    1. ``deepspeed.zero.Init(config_dict_or_path=ds)`` (its precision set to ``dtype``) around construction, with transformers'
       and torch's weight initialisation switched off (every value comes from the checkpoint): each module's
       parameters are partitioned as soon as it is built, so at most one module is ever whole;
    2. checkpoint keys are mapped onto parameter names (transformers' renamings, tied weights by identity);
    3. for each parameter, this rank's flat range ``[rank * p, rank * p + p)`` (``p`` = the partition size,
       padded; DeepSpeed's own layout, see ``Init._partition_param``) is read from its safetensors file (only
       the rows that cover it) and copied into ``param.ds_tensor`` in ``dtype``;
    4. buffers saved in the checkpoint (never partitioned) are copied whole.

    Raises naming every parameter the checkpoint lacks. ``tests/dist/test_model_path.py`` checks the result
    against ``from_pretrained`` gathered tensor by tensor."""
    import deepspeed
    from safetensors import safe_open
    from transformers import AutoConfig

    path = Path(path)
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    cls = _model_class(cfg)
    files = checkpoint_files(path)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    # zero.Init's dtype comes from the config: its explicit ``dtype`` argument is ignored on an accelerator
    # without fp16 (DeepSpeed 0.19 Init._set_dtype falls back to bf16 there, e.g. on CPU).
    ds = {**copy.deepcopy(ds), "bf16": {"enabled": dtype == torch.bfloat16},
          "fp16": {"enabled": dtype == torch.float16}}
    _set_config_dtype(cfg, dtype)
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds):
        model = cls.from_config(cfg, dtype=dtype) if hasattr(cls, "from_config") else cls._from_config(cfg, dtype=dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()

    key_of = checkpoint_key_map(model, files.keys())
    # One safe_open per tensor: the file is memory-mapped while open and every page read stays in this
    # process's resident set until it is unmapped, so a handle kept open would hold this rank's share of the
    # whole checkpoint (file pages) on top of its partitions.
    open_ = lambda f: safe_open(str(f), framework="pt")  # noqa: E731

    by_param: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
        params[id(p)] = p
    missing = []
    with torch.no_grad():
        for pid, names in by_param.items():
            p = params[pid]
            name = next((n for n in names if n in key_of), None)
            if name is None:
                missing.append(names[0])
                continue
            key = key_of[name]
            with open_(files[key]) as f:
                _load_partition(f.get_slice(key), p, key, name)
        loaded_buffers = set()
        for name, buf in model.named_buffers():
            if name in key_of and buf is not None:
                key = key_of[name]
                with open_(files[key]) as f:
                    buf.copy_(f.get_tensor(key).to(buf.dtype))
                loaded_buffers.add(name)
    _recompute_buffers(model, loaded_buffers)
    if missing:
        raise ValueError(f"model.path ({str(path)!r}): the checkpoint has no tensor for {len(missing)} "
                         f"parameter(s) of {cls.__name__}: {missing[:10]}")
    return model


def _load_partition(sl, p, key: str, name: str) -> None:
    """Copy this rank's flat range of checkpoint tensor ``key`` (a safetensors slice) into parameter ``p``."""
    import torch.distributed as dist

    shape = list(sl.get_shape())
    want = list(p.ds_shape) if hasattr(p, "ds_shape") else list(p.shape)
    if shape != want:
        raise ValueError(f"checkpoint tensor {key!r} has shape {shape}, the model's {name} {want}")
    if not hasattr(p, "ds_tensor"):  # not partitioned (zero.Init skipped it): copy whole
        p.data.copy_(_flat_range(sl, shape, 0, p.numel()).view_as(p).to(p.dtype))
        return
    part = p.ds_tensor
    size = part.numel()
    rank = getattr(p, "ds_zero_partition_rank", None)
    if rank is None:
        rank = dist.get_rank(group=getattr(p, "ds_process_group", None))
    start = rank * size
    end = min(start + size, math.prod(shape))
    if end > start:
        part.data[:end - start].copy_(_flat_range(sl, shape, start, end).to(part.dtype))


def _set_config_dtype(cfg, dtype: torch.dtype) -> None:
    """``dtype`` on a config and its sub-configs (vision/text): transformers builds each sub-model in its own
    config's dtype, and a tensor created in bf16 there (CLIP's class_embedding) would stay bf16 under fp32."""
    from transformers import PretrainedConfig

    cfg.dtype = dtype
    for value in vars(cfg).values():
        if isinstance(value, PretrainedConfig):
            _set_config_dtype(value, dtype)


def _recompute_buffers(model, loaded: set[str]) -> None:
    """Floating buffers a module computes in its ``__init__`` (rotary ``inv_freq``), in fp32 as ``from_pretrained``
    has them: zero.Init creates every floating tensor in the training dtype, so they came out rounded to bf16.
    Cast back to fp32 and recomputed with transformers' own rotary initialisation."""
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        names = [n for n, b in module.named_buffers(recurse=False)
                 if b is not None and b.is_floating_point() and prefix + n not in loaded]
        if not names:
            continue
        for n in names:
            module._buffers[n] = module._buffers[n].float()
        if "RotaryEmbedding" in type(module).__name__ and hasattr(model, "_init_weights"):
            model._init_weights(module)


def bf16_supported() -> tuple[bool, str]:
    """(supported, why): any CUDA GPU, or a CPU with native bf16 (AVX512-BF16 or AMX) that oneDNN uses."""
    if torch.cuda.is_available():
        return True, "CUDA"
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return native, ("CPU with native bf16" if native else "CPU without native bf16 (AVX512-BF16/AMX)")


def resolve_precision(ds: dict) -> tuple[dict, str]:
    """The DeepSpeed config with ``"bf16": {"enabled": "auto"}`` made concrete (bf16 where the hardware has it,
    fp32 elsewhere), and a one-line reason to print. Explicit true/false are kept."""
    bf = ds.get("bf16") or {}
    if bf.get("enabled") != "auto":
        return ds, f"bf16 {'on' if bf.get('enabled') else 'off'} (DeepSpeed config)"
    ok, why = bf16_supported()
    ds = copy.deepcopy(ds)
    ds["bf16"] = {**bf, "enabled": ok}
    return ds, f"bf16 auto -> {'bf16' if ok else 'fp32'} ({why})"
