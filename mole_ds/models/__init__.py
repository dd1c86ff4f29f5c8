"""Model-side helpers owned by the data half: the embedded tiny processor."""

from mole_ds.models.processor import build_tiny_processor, load_processor

__all__ = ["build_tiny_processor", "load_processor"]
