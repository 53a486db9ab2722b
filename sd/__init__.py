"""Stable Diffusion 1.5 from scratch in PyTorch."""

from .errors import SDError
from .model_loader import load_models

__all__ = ["SDError", "load_models"]
