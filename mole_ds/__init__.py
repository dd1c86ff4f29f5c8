"""mole_ds: sparse Mixtures of LoRA Experts (LLaVA-MoLE) for multimodal LLMs, trained with DeepSpeed."""
from .config import MoLEConfig
from .export import load_mole, save_consolidated
from .mole.block import MoLEMLP
from .mole.collect import aux_loss, aux_losses, routing_counts, routing_counts_by_sample
from .mole.lora import LoRALinear
from .patching import PatchReport, mole_layers, patch_model, set_prompt_mask, set_sample_domains

__version__ = "0.1.0"

__all__ = [
    "MoLEConfig", "MoLEMLP", "load_mole", "save_consolidated", "LoRALinear", "PatchReport", "patch_model", "mole_layers", "set_prompt_mask", "set_sample_domains",
    "aux_loss", "aux_losses", "routing_counts", "routing_counts_by_sample", "__version__",
]
