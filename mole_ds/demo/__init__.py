"""Demo data drawn locally (no download): multi-domain LLaVA-format JSON with real PNG images."""
from .generate import DOMAINS, generate_demo
__all__ = ["DOMAINS", "generate_demo"]
