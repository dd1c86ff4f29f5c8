"""Keep ZeRO-3's parameter fetches identical on every rank when some batches have no image."""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn


class VisionSync:
    """Under ZeRO-3 every rank must gather the same parameters in the same order. A text-only batch skips
    the vision tower, so its rank would fall out of step with a rank whose batch has images (a hang).

    A forward pass: LLaVA runs embeddings, then the vision tower, then the LLM. On a text-only batch this runs
    the vision tower and projector on one blank image right after the embeddings, i.e. at the same point in
    the fetch order, and adds 0 x its output to the embeddings (so the graph, and the projector's zero
    gradient, are identical too).

    generate() differs: call :meth:`before_generate` first (see there)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.llava = getattr(model, "model", model)
        if not hasattr(self.llava, "get_image_features"):
            raise TypeError(f"{type(model).__name__} has no vision tower to keep in step")
        vc = model.config.vision_config
        self.shape = (1, vc.num_channels if hasattr(vc, "num_channels") else 3, vc.image_size, vc.image_size)
        self.text_only = False
        self.once = False
        # transformers' generate() encodes images before prefill when the forward takes mm_encoder_outputs.
        self.encodes_before_prefill = "mm_encoder_outputs" in inspect.signature(model.forward).parameters
        self.llava.get_input_embeddings().register_forward_hook(self._hook)

    def _blank_features(self, dtype: torch.dtype, device) -> torch.Tensor:
        feats = self.llava.get_image_features(pixel_values=torch.zeros(self.shape, dtype=dtype, device=device))
        t = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        if isinstance(t, (list, tuple)):
            t = torch.cat([x.reshape(-1) for x in t])
        return t

    def _hook(self, module, args, output):
        if not self.text_only:
            return output
        if self.once:
            self.text_only = self.once = False
        return output + 0.0 * self._blank_features(output.dtype, output.device).sum().to(output.dtype)

    def before_generate(self, text_only: bool) -> None:
        """Put this rank in step for one generate() call on its batch (``text_only``: the batch has no image).

        generate() encodes a batch's images once, before the prefill step and outside the embeddings
        (transformers' ``mm_encoder_outputs``), and never again while decoding. So a text-only rank runs the
        blank image once now, and not at every decoding step's embeddings. With a transformers whose LLaVA
        forward has no ``mm_encoder_outputs``, images are encoded inside the prefill forward after the
        embeddings: the hook then fires for that first step only."""
        self.once = False
        if not text_only:
            self.text_only = False
        elif self.encodes_before_prefill:
            self.text_only = False
            p = next(self.model.parameters())
            with torch.no_grad():
                self._blank_features(p.dtype, p.device)
        else:
            self.text_only = self.once = True
