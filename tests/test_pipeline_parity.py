"""generate() gives the image of diffusers' StableDiffusionPipeline on the same weights and latents.

Tolerance: at most 1/255 per pixel (one step of 8-bit rounding): the models agree to ~1e-5
relative (test_parity), which moves a pixel by far less than one level, except where a value
lands right on a rounding boundary.
"""

import gc

import numpy as np
import pytest
import torch
from reference import reference_pipeline

from sd import generate, load_models

SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True,
)


@pytest.fixture(scope="module")
def both(safetensors_checkpoint):
    from diffusers import DDPMScheduler

    reference = reference_pipeline(safetensors_checkpoint, DDPMScheduler.from_config(SD15_SCHEDULER))
    ours = load_models(safetensors_checkpoint)
    yield ours, reference
    del ours, reference
    gc.collect()


def test_ddpm_text_to_image_matches_diffusers(both):
    ours, reference = both
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    settings = dict(prompt="a photograph of an astronaut riding a horse", negative_prompt="blurry", steps=3)
    # Both draw the DDPM steps' noise from a CPU generator seeded alike, in the same order.
    expected = reference(
        settings["prompt"], negative_prompt=settings["negative_prompt"], num_inference_steps=3, guidance_scale=7.5,
        height=64, width=64, latents=latents.clone(), generator=torch.Generator().manual_seed(5), output_type="np",
    ).images[0]
    actual = generate(**settings, cfg_scale=7.5, width=64, height=64, seed=5, latents=latents, models=ours, progress=False)[0]
    # Random weights still give a varied image, not one clipped flat to black or white.
    unclipped = ((expected > 0.01) & (expected < 0.99)).mean()
    assert unclipped > 0.5 and expected.std() > 0.05, (unclipped, expected.std())
    difference = np.abs(np.asarray(actual, dtype=np.float64) - np.round(expected * 255)).max()
    print(f"DDPM pipeline: max pixel difference {difference:.0f}/255")
    assert difference <= 1
