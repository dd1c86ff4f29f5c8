"""Tiny real transformers models built from configs, locally, with no download (tests and the demo)."""
from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration


def tiny_llama_config(vocab_size: int = 128, hidden_size: int = 64, intermediate_size: int = 128,
                      num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, **kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                       max_position_embeddings=kw.pop("max_position_embeddings", 512), **kw)


def build_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**kw)).to(dtype).eval()


def tiny_llava_config(vocab_size: int = 160, image_token_id: int = 150, image_size: int = 32, patch_size: int = 8,
                      vision_hidden: int = 32, pad_token_id: int | None = 0, **text_kw) -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden)
    text = tiny_llama_config(vocab_size=vocab_size, pad_token_id=pad_token_id, **text_kw)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu")


def image_seq_length(config: LlavaConfig) -> int:
    """Image tokens per image: patches, minus CLS under the 'default' feature strategy."""
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2
    return n + 1 if config.vision_feature_select_strategy == "full" else n


def build_tiny_llava(seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(tiny_llava_config(**kw)).to(dtype).eval()
