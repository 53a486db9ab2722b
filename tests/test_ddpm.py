"""The shared schedule (sd/sampling/schedule.py) and the DDPM sampler against diffusers' DDPMScheduler configured as SD 1.5
ships it. Every sampler's parity through `sample()` is in test_samplers.py; this file checks the DDPM step itself
more tightly, over up to 999 steps."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
    StableDiffusionImg2ImgPipeline,
)

from sd.sampling.ddpm import sample_ddpm
from sd.errors import SDError
from sd.sampling.schedule import SD15, first_step, leading_timesteps

# scheduler/scheduler_config.json of stable-diffusion-v1-5 (a PNDM config; DDPMScheduler ignores
# set_alpha_to_one and skip_prk_steps, and its own defaults fill in the rest, checked below)
SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "trained_betas": None,
}
LATENT_SHAPE = (2, 4, 8, 8)


@pytest.fixture
def reference() -> DDPMScheduler:
    scheduler = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    assert scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.variance_type == "fixed_small"
    assert scheduler.config.timestep_spacing == "leading"
    assert not scheduler.config.thresholding
    return scheduler


def test_schedule_equals_diffusers(reference):
    # the same float32 linspace and cumprod: equal to the last bit
    assert torch.equal(SD15.betas, reference.betas)
    assert torch.equal(SD15.alphas_cumprod, reference.alphas_cumprod)


@pytest.mark.parametrize("num_steps", [1, 2, 3, 20, 50, 999])
def test_timesteps_equal_diffusers(reference, num_steps):
    reference.set_timesteps(num_steps)
    timesteps = leading_timesteps(num_steps)
    assert timesteps.dtype == torch.long
    assert torch.equal(timesteps, reference.timesteps)


def test_50_steps_are_981_to_1():
    assert leading_timesteps(50).tolist() == list(range(981, 0, -20))


@pytest.mark.parametrize("num_steps", [0, 1000])
def test_step_counts_out_of_range_are_refused(num_steps):
    # 1000 steps would start at timestep 1000, past the schedule (diffusers raises IndexError there)
    with pytest.raises(SDError, match="steps"):
        leading_timesteps(num_steps)


@pytest.mark.parametrize("timesteps", [torch.tensor([981, 1]), 501])
def test_add_noise_equals_diffusers(reference, timesteps):
    generator = torch.Generator().manual_seed(0)
    original = torch.randn(LATENT_SHAPE, generator=generator)
    noise = torch.randn(LATENT_SHAPE, generator=generator)
    ours = SD15.add_noise(original, timesteps, noise)
    expected = reference.add_noise(original, noise, torch.as_tensor(timesteps))
    # O(1) values from the same float32 formula: 1e-6 allows a few roundings, nothing more
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def assert_same_latents(ours, expected):
    # float32 keeps ~7 digits: 1e-6 absolute for O(1) latents, plus 1e-6 relative (a few ulps) since
    # random model outputs inflate latents to ~70; a wrong formula (e.g. the previous timestep of the
    # last step with more than 500 steps) is off by ~1e-1
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def run_ddpm(num_steps: int, draw_noise) -> list[torch.Tensor]:
    """The latents the model sees at every step and those after the last, with seeded model outputs."""
    inputs = torch.Generator().manual_seed(1)
    seen = []

    def predict_noise(x, timestep):
        seen.append(x)
        return torch.randn(LATENT_SHAPE, generator=inputs)

    timesteps = leading_timesteps(num_steps)
    alpha_bars = torch.stack([SD15.alpha_bar(t) for t in [*timesteps.tolist(), -1]])
    final = sample_ddpm(predict_noise, torch.randn(LATENT_SHAPE, generator=inputs), timesteps, alpha_bars, draw_noise, progress=False)
    return [*seen, final]


def run_reference(reference: DDPMScheduler, num_steps: int, noise: torch.Generator) -> list[torch.Tensor]:
    inputs = torch.Generator().manual_seed(1)
    reference.set_timesteps(num_steps)
    latents = [torch.randn(LATENT_SHAPE, generator=inputs)]
    for timestep in reference.timesteps:
        model_output = torch.randn(LATENT_SHAPE, generator=inputs)
        latents.append(reference.step(model_output, timestep, latents[-1], generator=noise).prev_sample)
    return latents


@pytest.mark.parametrize("num_steps", [1, 2, 20, 50, 999])
def test_every_step_equals_diffusers_with_same_seed(reference, num_steps):
    # both draw one randn(shape) per step from a CPU generator seeded alike
    draws = torch.Generator().manual_seed(7)
    ours = run_ddpm(num_steps, lambda like: torch.randn(like.shape, generator=draws))
    expected = run_reference(reference, num_steps, torch.Generator().manual_seed(7))
    assert len(ours) == len(expected) == num_steps + 1
    for our_latents, expected_latents in zip(ours, expected):
        assert_same_latents(our_latents, expected_latents)


def test_injected_noise_replaces_the_generator(reference):
    # noise handed in step by step, not drawn from a generator: only it can make the result match
    noise = iter(torch.randn((20, *LATENT_SHAPE), generator=torch.Generator().manual_seed(7)))
    ours = run_ddpm(20, lambda like: next(noise))
    expected = run_reference(reference, 20, torch.Generator().manual_seed(7))
    for our_latents, expected_latents in zip(ours, expected):
        assert_same_latents(our_latents, expected_latents)


@pytest.mark.parametrize(
    "num_steps, strength", [(50, 1.0), (50, 0.8), (20, 0.75), (20, 0.05), (30, 0.33), (1, 1.0)]
)
def test_strength_equals_diffusers_img2img(reference, num_steps, strength):
    reference.set_timesteps(num_steps)
    pipeline = SimpleNamespace(scheduler=reference)
    expected, _ = StableDiffusionImg2ImgPipeline.get_timesteps(pipeline, num_steps, strength, "cpu")
    assert torch.equal(leading_timesteps(num_steps)[first_step(num_steps, strength) :], expected)


@pytest.mark.parametrize("num_steps, strength", [(20, 0.04), (20, 0.0), (1, 0.5)])
def test_tiny_strength_keeps_one_step(num_steps, strength):
    # diffusers would run no step at all here
    assert first_step(num_steps, strength) == num_steps - 1


@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_strength_out_of_range_is_refused(strength):
    with pytest.raises(SDError, match="strength"):
        first_step(20, strength)
