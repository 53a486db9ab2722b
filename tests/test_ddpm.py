"""DDPMSampler against diffusers' DDPMScheduler configured as SD 1.5 ships it."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
    StableDiffusionImg2ImgPipeline,
)

from sd.ddpm import DDPMSampler
from sd.errors import SDError

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
    schedule = DDPMSampler(torch.Generator()).schedule
    # the same float32 linspace and cumprod: equal to the last bit
    assert torch.equal(schedule.betas, reference.betas)
    assert torch.equal(schedule.alphas_cumprod, reference.alphas_cumprod)


@pytest.mark.parametrize("num_steps", [1, 2, 3, 20, 50, 999])
def test_timesteps_equal_diffusers(reference, num_steps):
    sampler = DDPMSampler(torch.Generator())
    sampler.set_inference_timesteps(num_steps)
    reference.set_timesteps(num_steps)
    assert sampler.timesteps.dtype == torch.long
    assert torch.equal(sampler.timesteps, reference.timesteps)


def test_50_steps_are_981_to_1():
    sampler = DDPMSampler(torch.Generator())
    sampler.set_inference_timesteps(50)
    assert sampler.timesteps.tolist() == list(range(981, 0, -20))


@pytest.mark.parametrize("num_steps", [0, 1000])
def test_step_counts_out_of_range_are_refused(num_steps):
    # 1000 steps would start at timestep 1000, past the schedule (diffusers raises IndexError there)
    with pytest.raises(SDError, match="steps"):
        DDPMSampler(torch.Generator()).set_inference_timesteps(num_steps)


@pytest.mark.parametrize("timesteps", [torch.tensor([981, 1]), 501])
def test_add_noise_equals_diffusers(reference, timesteps):
    generator = torch.Generator().manual_seed(0)
    original = torch.randn(LATENT_SHAPE, generator=generator)
    noise = torch.randn(LATENT_SHAPE, generator=generator)
    ours = DDPMSampler(torch.Generator()).add_noise(original, timesteps, noise)
    expected = reference.add_noise(original, noise, torch.as_tensor(timesteps))
    # O(1) values from the same float32 formula: 1e-6 allows a few roundings, nothing more
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def assert_same_latents(ours, expected):
    # float32 keeps ~7 digits: 1e-6 absolute for O(1) latents, plus 1e-6 relative (a few ulps) since
    # random model outputs inflate latents to ~70; a wrong formula (e.g. the previous timestep of the
    # last step with more than 500 steps) is off by ~1e-1
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_steps", [1, 2, 20, 50, 999])
def test_every_step_equals_diffusers_with_same_seed(reference, num_steps):
    inputs = torch.Generator().manual_seed(1)
    sampler = DDPMSampler(torch.Generator().manual_seed(7))
    reference_noise = torch.Generator().manual_seed(7)  # both draw one randn(shape) per step from it
    sampler.set_inference_timesteps(num_steps)
    reference.set_timesteps(num_steps)

    ours = expected = torch.randn(LATENT_SHAPE, generator=inputs)
    for timestep in sampler.timesteps:
        model_output = torch.randn(LATENT_SHAPE, generator=inputs)
        ours = sampler.step(timestep, ours, model_output)
        expected = reference.step(model_output, timestep, expected, generator=reference_noise).prev_sample
        assert_same_latents(ours, expected)


def test_injected_noise_replaces_the_generator(reference):
    inputs = torch.Generator().manual_seed(1)
    our_noise = torch.Generator().manual_seed(7)
    reference_noise = torch.Generator().manual_seed(7)
    # a sampler seeded differently: only the injected noise can make it match
    sampler = DDPMSampler(torch.Generator().manual_seed(123))
    sampler.set_inference_timesteps(20)
    reference.set_timesteps(20)

    ours = expected = torch.randn(LATENT_SHAPE, generator=inputs)
    for timestep in sampler.timesteps:
        model_output = torch.randn(LATENT_SHAPE, generator=inputs)
        noise = torch.randn(LATENT_SHAPE, generator=our_noise)
        ours = sampler.step(timestep, ours, model_output, noise=noise)
        expected = reference.step(model_output, timestep, expected, generator=reference_noise).prev_sample
        assert_same_latents(ours, expected)


@pytest.mark.parametrize(
    "num_steps, strength", [(50, 1.0), (50, 0.8), (20, 0.75), (20, 0.05), (30, 0.33), (1, 1.0)]
)
def test_strength_equals_diffusers_img2img(reference, num_steps, strength):
    sampler = DDPMSampler(torch.Generator())
    sampler.set_inference_timesteps(num_steps)
    sampler.set_strength(strength)
    reference.set_timesteps(num_steps)
    pipeline = SimpleNamespace(scheduler=reference)
    expected, _ = StableDiffusionImg2ImgPipeline.get_timesteps(pipeline, num_steps, strength, "cpu")
    assert torch.equal(sampler.timesteps, expected)


@pytest.mark.parametrize("num_steps, strength", [(20, 0.04), (20, 0.0), (1, 0.5)])
def test_tiny_strength_keeps_one_step(num_steps, strength):
    # diffusers would run no step at all here
    sampler = DDPMSampler(torch.Generator())
    sampler.set_inference_timesteps(num_steps)
    sampler.set_strength(strength)
    assert sampler.timesteps.tolist() == [1]


@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_strength_out_of_range_is_refused(strength):
    with pytest.raises(SDError, match="strength"):
        DDPMSampler(torch.Generator()).set_strength(strength)
