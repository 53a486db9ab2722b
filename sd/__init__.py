"""Stable Diffusion 1.5 from scratch in PyTorch."""

from .batch import Job
from .cluster import BatchFailed, render_batch
from .embeddings import load_embeddings
from .errors import SDError
from .model_loader import load_models
from .pipeline import generate
from .prompts import encode_prompt, parse_prompt, prompt_chunks
from .settings import Settings

__all__ = ["BatchFailed", "Job", "SDError", "Settings", "generate", "render_batch", "encode_prompt", "load_embeddings", "load_models", "parse_prompt", "prompt_chunks"]
