"""generate() gives the image of diffusers' StableDiffusionPipeline on the same weights and latents, with each
sampler and the matching diffusers scheduler, and that of StableDiffusionImg2ImgPipeline from the same image.

Tolerance: at most 1/255 per pixel (one step of 8-bit rounding): the models agree to ~1e-5
relative (test_parity) and the samplers to ~1e-6 (test_samplers), which moves a pixel by far less than one
level, except where a value lands right on a rounding boundary.
"""

import gc

import numpy as np
import pytest
import torch
from PIL import Image
from reference import reference_pipeline

from sd import generate, load_models

SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True,
)


PROMPT = dict(prompt="a photograph of an astronaut riding a horse", negative_prompt="blurry")


@pytest.fixture(scope="module")
def both(safetensors_checkpoint):
    from diffusers import DDPMScheduler

    reference = reference_pipeline(safetensors_checkpoint, DDPMScheduler.from_config(SD15_SCHEDULER))
    ours = load_models(safetensors_checkpoint)
    yield ours, reference
    del ours, reference
    gc.collect()


def assert_same_image(actual, expected: np.ndarray, label: str) -> None:
    # Random weights still give a varied image, not one clipped flat to black or white.
    unclipped = ((expected > 0.01) & (expected < 0.99)).mean()
    assert unclipped > 0.5 and expected.std() > 0.05, (unclipped, expected.std())
    difference = np.abs(np.asarray(actual, dtype=np.float64) - np.round(expected * 255)).max()
    print(f"{label}: max pixel difference {difference:.0f}/255")
    assert difference <= 1


def test_ddpm_text_to_image_matches_diffusers(both):
    ours, reference = both
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    # Both draw the DDPM steps' noise from a CPU generator seeded alike, in the same order.
    expected = reference(
        **PROMPT, num_inference_steps=3, guidance_scale=7.5,
        height=64, width=64, latents=latents.clone(), generator=torch.Generator().manual_seed(5), output_type="np",
    ).images[0]
    actual = generate(**PROMPT, steps=3, cfg_scale=7.5, width=64, height=64, seed=5, latents=latents, models=ours, progress=False)[0]
    assert_same_image(actual, expected, "DDPM pipeline")


def scheduler(name: str, karras: bool = False):
    import diffusers

    schedulers = dict(
        ddim="DDIMScheduler", pndm="PNDMScheduler", lms="LMSDiscreteScheduler", euler="EulerDiscreteScheduler",
        heun="HeunDiscreteScheduler", dpmpp_2m="DPMSolverMultistepScheduler", unipc="UniPCMultistepScheduler",
    )
    return getattr(diffusers, schedulers[name]).from_config(SD15_SCHEDULER, **({"use_karras_sigmas": True} if karras else {}))


@pytest.mark.parametrize(
    "name, karras",
    [("ddim", False), ("pndm", False), ("lms", False), ("euler", False), ("heun", False), ("dpmpp_2m", False),
     ("unipc", False), ("dpmpp_2m", True)],
)
def test_text_to_image_matches_diffusers(both, name, karras):
    from diffusers import StableDiffusionPipeline

    ours, reference = both
    pipeline = StableDiffusionPipeline(**{**reference.components, "scheduler": scheduler(name, karras)})
    # unit-variance latents, which each side scales to its sampler's starting noise
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    expected = pipeline(
        **PROMPT, num_inference_steps=4, guidance_scale=7.5, height=64, width=64, latents=latents.clone(), output_type="np",
    ).images[0]
    actual = generate(**PROMPT, sampler=name, karras=karras, steps=4, cfg_scale=7.5, width=64, height=64, latents=latents, models=ours, progress=False)[0]
    assert_same_image(actual, expected, f"{name}{' karras' * karras} pipeline")


@pytest.mark.parametrize("width, height", [(64, 72), (72, 64), (88, 120)])
def test_sizes_that_are_not_multiples_of_64_match_diffusers(both, width, height):
    """Latents of 9 rows go 9 -> 5 -> 3 -> 2 down the U-Net and must come back up to each skip's size."""
    from diffusers import StableDiffusionPipeline

    ours, reference = both
    pipeline = StableDiffusionPipeline(**{**reference.components, "scheduler": scheduler("ddim")})
    latents = torch.randn(1, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(11))
    expected = pipeline(
        **PROMPT, num_inference_steps=2, guidance_scale=7.5, height=height, width=width, latents=latents.clone(), output_type="np",
    ).images[0]
    actual = generate(**PROMPT, sampler="ddim", steps=2, cfg_scale=7.5, width=width, height=height, latents=latents, models=ours, progress=False)[0]
    assert actual.size == (width, height)
    assert_same_image(actual, expected, f"{width}x{height} pipeline")


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_image_to_image_matches_diffusers(both, name):
    from diffusers import StableDiffusionImg2ImgPipeline

    ours, reference = both
    pipeline = StableDiffusionImg2ImgPipeline(**{**reference.components, "scheduler": scheduler(name)})
    pixels = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image = Image.fromarray(np.clip(pixels // 2 + np.linspace(0, 127, 64, dtype=np.uint8)[:, None, None], 0, 255))
    # Both draw the encoder's noise, then the noise added to the image, from a CPU generator seeded alike.
    expected = pipeline(
        **PROMPT, image=image, strength=0.6, num_inference_steps=4, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(5), output_type="np",
    ).images[0]
    actual = generate(**PROMPT, input_image=image, strength=0.6, sampler=name, steps=4, cfg_scale=7.5, width=64, height=64, seed=5, models=ours, progress=False)[0]
    assert_same_image(actual, expected, f"{name} image-to-image pipeline")


def test_a1111_prompt_matches_diffusers_given_its_conditioning(both, tmp_path):
    """A long weighted prompt with a textual-inversion embedding, clip skip 2: our render equals diffusers' pipeline
    given A1111's conditioning computed from transformers' CLIP (tests/reference.py), the negative prompt padded
    with the empty prompt's. diffusers' load_textual_inversion adds the embedding's vectors to CLIP's vocabulary
    as new tokens; the reference puts those tokens where our chunking placed the embedding."""
    from diffusers import StableDiffusionPipeline
    from reference import a1111_conditioning
    from test_embeddings import TRIGGER, random_vectors, write_embedding

    from sd import load_embeddings
    from sd.prompts.conditioning import chunk_prompt

    ours, reference = both
    embedding_file = write_embedding(tmp_path, "a1111.pt", random_vectors(2, seed=7))
    embeddings = load_embeddings(tmp_path)
    # 3 chunks, the embedding weighted in the second and in the negative prompt
    prompt = "(masterpiece:1.2), a [red] house, " + ", ".join(["((tall)) tree"] * 24) + f", ({TRIGGER}:1.1) BREAK (sky:0.7)"
    negative = f"(blurry:1.3), text, {TRIGGER}"
    pipeline = StableDiffusionPipeline(**{**reference.components, "scheduler": scheduler("ddim")})
    pipeline.load_textual_inversion(str(embedding_file), token=TRIGGER)
    try:
        vector_ids = pipeline.tokenizer.convert_tokens_to_ids([TRIGGER, f"{TRIGGER}_1"])

        def conditioning(text: str) -> torch.Tensor:
            chunks, placements = chunk_prompt(text, embeddings=embeddings)
            for chunk, position, _ in placements:
                chunks[chunk][0][position:position + 2] = vector_ids
            return a1111_conditioning(pipeline.text_encoder, chunks, clip_skip=2), [chunk for chunk, _, _ in placements]

        (embeds, placed), (negative_embeds, _), (empty, _) = (conditioning(text) for text in (prompt, negative, ""))
        assert embeds.shape[1] == 3 * 77 and placed == [1]
        negative_embeds = torch.cat([negative_embeds, empty, empty], dim=1)  # (1, 77, 768) -> (1, 231, 768)
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
        expected = pipeline(
            prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, num_inference_steps=2, guidance_scale=7.5,
            height=64, width=64, latents=latents.clone(), output_type="np",
        ).images[0]
    finally:
        pipeline.unload_textual_inversion()  # the shared text encoder as it was
    actual = generate(prompt, negative_prompt=negative, clip_skip=2, sampler="ddim", steps=2, cfg_scale=7.5, width=64, height=64,
                      latents=latents, models=ours, embeddings=embeddings, progress=False)[0]
    as_words = generate(prompt, negative_prompt=negative, clip_skip=2, sampler="ddim", steps=2, cfg_scale=7.5, width=64, height=64,
                        latents=latents, models=ours, progress=False)[0]
    effect = np.abs(np.asarray(as_words, dtype=np.float64) - np.round(expected * 255)).max()
    print(f"the trigger read as words instead: max pixel difference {effect:.0f}/255")
    assert effect > 8  # the embedding's vectors matter: placed wrongly or not at all, the test would see it
    assert_same_image(actual, expected, "A1111 prompt pipeline")
