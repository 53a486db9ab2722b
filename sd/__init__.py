"""Stable Diffusion 1.5 from scratch in PyTorch."""

from .errors import SDError
from .model_loader import load_models
from .pipeline import generate

__all__ = ["SDError", "generate", "load_models"]
