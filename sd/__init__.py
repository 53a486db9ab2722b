"""Stable Diffusion 1.5 from scratch in PyTorch."""

from .batch import Job
from .cluster import BatchFailed, render_batch
from .control import ControlNetUnit
from .prompts.embeddings import load_embeddings
from .errors import SDError
from .files.lora import LoraLibrary
from .files.loader import load_controlnet, load_models, swap_vae
from .pipeline import generate
from .prompts.conditioning import encode_prompt, parse_prompt, prompt_chunks
from .settings import Settings

__all__ = ["BatchFailed", "ControlNetUnit", "Job", "LoraLibrary", "SDError", "Settings", "generate", "render_batch", "encode_prompt",
           "load_controlnet", "load_embeddings", "load_models", "parse_prompt", "prompt_chunks", "swap_vae"]
