"""Every sampler behind one call, so the pipeline never changes when a sampler is added.

A sampler gets `predict_noise(latents, timestep) -> noise`, the U-Net with guidance applied,
and walks from pure noise (or a noised input image) to clean latents.
"""

from collections.abc import Callable

import torch
from tqdm import tqdm

from .ddpm import DDPMSampler

NoisePredictor = Callable[[torch.Tensor, float], torch.Tensor]


def sample_ddpm(predict_noise: NoisePredictor, noise: torch.Tensor, steps: int, generator: torch.Generator, image_latents: torch.Tensor | None = None, strength: float = 1.0, progress: bool = True) -> torch.Tensor:
    sampler = DDPMSampler(generator)
    sampler.set_inference_timesteps(steps)
    if image_latents is None:
        x = noise
    else:
        sampler.set_strength(strength)
        x = sampler.add_noise(image_latents, sampler.timesteps[0], noise)
    for timestep in tqdm(sampler.timesteps.tolist(), disable=not progress, desc="sampling", unit="step"):
        x = sampler.step(timestep, x, predict_noise(x, timestep))
    return x


# name -> (function, the name AUTOMATIC1111 writes in PNG metadata)
SAMPLERS = {"ddpm": (sample_ddpm, "DDPM")}


def sample(name: str, predict_noise: NoisePredictor, noise: torch.Tensor, steps: int, generator: torch.Generator, image_latents: torch.Tensor | None = None, strength: float = 1.0, progress: bool = True) -> torch.Tensor:
    """Clean latents (B, 4, h, w) from unit-variance `noise` of the same shape, or from `image_latents` noised
    to `strength` (image-to-image). Extra noise the sampler needs comes from `generator`."""
    function, _ = SAMPLERS[name]
    return function(predict_noise, noise, steps, generator, image_latents, strength, progress)
