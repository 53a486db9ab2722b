"""Stable Diffusion 1.5 from scratch in PyTorch."""

from .embeddings import load_embeddings
from .errors import SDError
from .lora import LoraLibrary
from .model_loader import load_models
from .pipeline import generate
from .prompts import encode_prompt, parse_prompt, prompt_chunks
from .settings import Settings

__all__ = ["SDError", "Settings", "generate", "encode_prompt", "load_embeddings", "LoraLibrary", "load_models", "parse_prompt", "prompt_chunks"]
