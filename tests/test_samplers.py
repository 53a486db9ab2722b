"""Every sampler against the diffusers scheduler of the same name, each built with `from_config` from SD 1.5's
scheduler configuration and otherwise its own defaults (timestep spacing included).

Both sides run the loop of diffusers' pipelines on the same model outputs: a toy noise predictor returning seeded
noise plus half its input, so a side that fed the model different latents would also get different outputs.
Compared: the timestep of every model call, exactly, and the latents the model sees at every call and those
after the last step, which together are the latents after every step (in the U-Net's unit-variance view).

Tolerance: 1e-5 of the largest magnitude in the tensor. Both sides compute in float32 in different but equivalent
orders (DPM-Solver++ and UniPC in sigma form against diffusers' alpha form, LMS's weights integrated exactly
against diffusers' quadrature, PLMS's step in DDIM's form): each step differs by ~1e-7 and the worst seen is
2.3e-6 (UniPC, 50 steps). A wrong coefficient or schedule is off by 1e-3 or more.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    UniPCMultistepScheduler,
)

from sd.errors import SDError
from sd.sampling.samplers import SAMPLERS, display_name, sample

SD15_SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False,
)
REFERENCES = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "lms": LMSDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}
KARRAS = ["lms", "euler", "euler_a", "heun", "dpmpp_2m", "unipc"]
DETERMINISTIC = [(name, False) for name in ["ddim", "pndm", "lms", "euler", "heun", "dpmpp_2m", "unipc"]] + [
    (name, True) for name in KARRAS if name != "euler_a"
]
STEP_COUNTS = [1, 2, 20, 50]
SHAPE = (2, 4, 8, 8)
TOLERANCE = 1e-5
# diffusers' schedulers trip numpy 2's deprecation of __array__ without `copy`
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


class ToyModel:
    """Seeded noise plus half the input, recording what it is given."""

    def __init__(self):
        self.generator = torch.Generator().manual_seed(1)
        self.inputs, self.timesteps = [], []

    def __call__(self, x, timestep):
        self.inputs.append(x)
        self.timesteps.append(float(timestep))
        return torch.randn(SHAPE, generator=self.generator) + 0.5 * x


class EulerAncestralKarrasScheduler(EulerAncestralDiscreteScheduler):
    """diffusers' Euler a has no Karras option: its step on Euler's Karras schedule, as k-diffusion combines them."""

    def set_timesteps(self, num_inference_steps, device=None):
        super().set_timesteps(num_inference_steps, device)
        karras = EulerDiscreteScheduler.from_config(self.config, use_karras_sigmas=True)
        karras.set_timesteps(num_inference_steps, device)
        self.sigmas, self.timesteps = karras.sigmas, karras.timesteps


def reference_scheduler(name: str, karras: bool):
    if name == "euler_a" and karras:
        return EulerAncestralKarrasScheduler.from_config(SD15_SCHEDULER_CONFIG)
    scheduler = REFERENCES[name].from_config(SD15_SCHEDULER_CONFIG, **({"use_karras_sigmas": True} if karras else {}))
    # the defaults the issue names: nothing that would change the comparison is switched on
    assert scheduler.config.prediction_type == "epsilon"
    assert not getattr(scheduler.config, "thresholding", False)
    return scheduler


def step_options(name: str, eta: float, seed: int):
    """The reference's extra arguments to `step` at each step."""
    # both sides draw the stochastic samplers' noise from a CPU generator seeded alike
    draws = torch.Generator().manual_seed(seed)

    def options(i: int) -> dict:
        if name in ("ddpm", "euler_a"):
            return {"generator": draws}
        if eta:
            return {"eta": eta, "generator": draws}
        if name == "lms":
            # what diffusers' LMS does from the start; in image-to-image it takes the order from the step's index
            # in the whole schedule instead and weighs the first slopes as if it had older ones
            return {"order": min(i + 1, 4)}
        return {}

    return options


def reference_loop(scheduler, model, latents, timesteps, options) -> torch.Tensor:
    """The denoising loop of diffusers' StableDiffusionPipeline and StableDiffusionImg2ImgPipeline."""
    for i, timestep in enumerate(timesteps):
        model_output = model(scheduler.scale_model_input(latents, timestep), timestep)
        latents = scheduler.step(model_output, timestep, latents, **options(i)).prev_sample
    return latents


def relative_difference(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return ((ours - expected).abs().max() / expected.abs().max()).item()


def assert_same_run(ours: ToyModel, our_latents, expected: ToyModel, expected_latents) -> float:
    assert ours.timesteps == expected.timesteps
    differences = [relative_difference(a, b) for a, b in zip(ours.inputs, expected.inputs)]
    worst = max([*differences, relative_difference(our_latents, expected_latents)])
    assert worst <= TOLERANCE, differences
    return worst


def text_to_image(name, karras, steps, eta=0.0, seed=2):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ours, expected = ToyModel(), ToyModel()
    our_latents = sample(name, ours, noise, steps, torch.Generator().manual_seed(seed), progress=False, karras=karras, eta=eta)

    scheduler = reference_scheduler(name, karras)
    scheduler.set_timesteps(steps)
    expected_latents = reference_loop(scheduler, expected, noise * scheduler.init_noise_sigma, scheduler.timesteps, step_options(name, eta, seed))
    return ours, our_latents, expected, expected_latents


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("name, karras", DETERMINISTIC)
def test_deterministic_samplers_equal_diffusers(name, karras, steps):
    worst = assert_same_run(*text_to_image(name, karras, steps))
    print(f"{display_name(name, karras)}, {steps} steps: max relative difference {worst:.1e}")


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("name, karras, eta", [("ddpm", False, 0.0), ("euler_a", False, 0.0), ("euler_a", True, 0.0), ("ddim", False, 0.5), ("ddim", False, 1.0)])
def test_stochastic_samplers_equal_diffusers_with_the_same_noise(name, karras, eta, steps):
    worst = assert_same_run(*text_to_image(name, karras, steps, eta))
    print(f"{display_name(name, karras)}{f' eta {eta}' * bool(eta)}, {steps} steps: max relative difference {worst:.1e}")


def test_stochastic_samplers_depend_on_the_seed():
    # guards the test above against noise that never reaches the result
    for name, eta in [("ddpm", 0.0), ("euler_a", 0.0), ("ddim", 1.0)]:
        _, first, _, _ = text_to_image(name, False, 20, eta, seed=2)
        _, second, _, _ = text_to_image(name, False, 20, eta, seed=3)
        assert relative_difference(first, second) > 1e-2


@pytest.mark.parametrize("steps", [*STEP_COUNTS, 999])
@pytest.mark.parametrize("name, karras", [(name, karras) for name in KARRAS for karras in (False, True)])
def test_sigma_schedules_equal_diffusers(name, karras, steps):
    scheduler = reference_scheduler(name, karras)
    scheduler.set_timesteps(steps)
    sigmas, timesteps = scheduler.sigmas, scheduler.timesteps
    if name == "heun":  # diffusers lists each sigma but the first and last twice, for the two calls of a step
        sigmas, timesteps = torch.cat([sigmas[:1], sigmas[1:-1:2], sigmas[-1:]]), timesteps[::2]
    ours = SAMPLERS[name].schedule(steps, karras)
    # the same float64 spacing and interpolation rounded to float32: equal to the last bit
    assert torch.equal(ours.sigmas, sigmas)
    assert ours.timesteps.dtype == timesteps.dtype and torch.equal(ours.timesteps, timesteps)


def image_to_image(name, karras, steps, strength):
    generator = torch.Generator().manual_seed(0)
    image_latents, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    ours, expected = ToyModel(), ToyModel()
    our_latents = sample(name, ours, noise, steps, torch.Generator().manual_seed(2), image_latents, strength, progress=False, karras=karras)

    scheduler = reference_scheduler(name, karras)
    scheduler.set_timesteps(steps)
    if name == "pndm":
        # diffusers' img2img cuts PLMS's list of calls, which repeats one timestep for the warm-up, instead of the
        # timesteps, and then mistakes the timesteps of its first steps; PLMS on the timesteps img2img keeps:
        kept = scheduler._timesteps[: int(steps * strength)]  # ascending
        timesteps = torch.from_numpy(np.concatenate([kept[:-1], kept[-2:-1], kept[-1:]])[::-1].copy())
    else:
        timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
    latents = scheduler.add_noise(image_latents, noise, timesteps[:1])
    expected_latents = reference_loop(scheduler, expected, latents, timesteps, step_options(name, 0.0, seed=2))
    return ours, our_latents, expected, expected_latents


@pytest.mark.parametrize("steps, strength", [(20, 0.6), (4, 0.6), (50, 0.3), (20, 0.05), (20, 1.0)])
@pytest.mark.parametrize("name, karras", [*DETERMINISTIC, ("ddpm", False), ("euler_a", False)])
def test_image_to_image_equals_diffusers(name, karras, steps, strength):
    worst = assert_same_run(*image_to_image(name, karras, steps, strength))
    print(f"{display_name(name, karras)} img2img {steps} steps at {strength}: max relative difference {worst:.1e}")


@pytest.mark.parametrize("name", SAMPLERS)
def test_a_fixed_number_of_steps_runs_the_end_of_a_longer_schedule(name):
    # A1111's hires fix: the last 20 steps of a schedule of 28; image-to-image's strength path (equal to diffusers',
    # above) runs the same steps at a strength whose share of 28 rounds down to 20
    generator = torch.Generator().manual_seed(0)
    image_latents, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    fixed, shared = ToyModel(), ToyModel()
    fixed_latents = sample(name, fixed, noise, 20, torch.Generator().manual_seed(2), image_latents, progress=False, schedule_steps=28)
    shared_latents = sample(name, shared, noise, 28, torch.Generator().manual_seed(2), image_latents, 20.5 / 28, progress=False)
    assert fixed.timesteps == shared.timesteps
    assert torch.equal(fixed_latents, shared_latents)


@pytest.mark.parametrize("name", SAMPLERS)
def test_tiny_strength_still_runs_the_last_step(name):
    # 20 steps at strength 0.01 is no step at all in diffusers' img2img
    model = ToyModel()
    image_latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    latents = sample(name, model, torch.zeros(SHAPE), 20, torch.Generator().manual_seed(2), image_latents, 0.01, progress=False)
    last_timestep = {"ddpm": 1, "ddim": 1, "pndm": 1, "dpmpp_2m": 50, "unipc": 50}.get(name, 0)
    assert model.timesteps == [last_timestep]
    assert not torch.equal(latents, image_latents)


@pytest.mark.parametrize(
    "name, karras, expected",
    [("ddpm", False, "DDPM"), ("ddim", False, "DDIM"), ("pndm", False, "PLMS"), ("lms", False, "LMS"),
     ("lms", True, "LMS Karras"), ("euler", False, "Euler"), ("euler_a", False, "Euler a"), ("heun", False, "Heun"),
     ("dpmpp_2m", False, "DPM++ 2M"), ("dpmpp_2m", True, "DPM++ 2M Karras"), ("unipc", False, "UniPC")],
)
def test_display_names_are_automatic1111s(name, karras, expected):
    assert display_name(name, karras) == expected


@pytest.mark.parametrize("name", ["ddpm", "ddim", "pndm"])
def test_karras_without_a_sigma_schedule_is_refused(name):
    with pytest.raises(SDError, match=f"karras.*{name} walks timesteps.*dpmpp_2m"):
        sample(name, ToyModel(), torch.zeros(SHAPE), 20, torch.Generator(), karras=True)


@pytest.mark.parametrize("name", [name for name in SAMPLERS if name != "ddim"])
def test_eta_outside_ddim_is_refused(name):
    with pytest.raises(SDError, match=f"eta applies to the ddim sampler only, not {name}"):
        sample(name, ToyModel(), torch.zeros(SHAPE), 20, torch.Generator(), eta=0.5)


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_eta_out_of_range_is_refused(eta):
    with pytest.raises(SDError, match="eta must be between 0"):
        sample("ddim", ToyModel(), torch.zeros(SHAPE), 20, torch.Generator(), eta=eta)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("steps", [0, 1000])
def test_step_counts_out_of_range_are_refused(name, steps):
    with pytest.raises(SDError, match="steps must be between 1 and 999"):
        sample(name, ToyModel(), torch.zeros(SHAPE), steps, torch.Generator())
