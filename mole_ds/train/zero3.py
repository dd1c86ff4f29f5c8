"""Keep ZeRO-3's parameter fetches identical on every rank when some batches have no image."""
from __future__ import annotations

import torch
import torch.nn as nn


class VisionSync:
    """Under ZeRO-3 every rank must gather the same parameters in the same order. A text-only batch skips
    the vision tower, so its rank would fall out of step with a rank whose batch has images (a hang).

    LLaVA runs embeddings, then the vision tower, then the LLM. On a text-only batch this runs the vision
    tower and projector on one blank image right after the embeddings, i.e. at the same point in the
    fetch order, and adds 0 x its output to the embeddings (so the graph, and the projector's zero
    gradient, are identical too)."""

    def __init__(self, model: nn.Module) -> None:
        self.llava = getattr(model, "model", model)
        if not hasattr(self.llava, "get_image_features"):
            raise TypeError(f"{type(model).__name__} has no vision tower to keep in step")
        vc = model.config.vision_config
        self.shape = (1, vc.num_channels if hasattr(vc, "num_channels") else 3, vc.image_size, vc.image_size)
        self.text_only = False
        self.llava.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if not self.text_only:
            return output
        pixels = torch.zeros(self.shape, dtype=output.dtype, device=output.device)
        feats = self.llava.get_image_features(pixel_values=pixels)
        t = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        if isinstance(t, (list, tuple)):
            t = torch.cat([x.reshape(-1) for x in t])
        return output + 0.0 * t.sum().to(output.dtype)
