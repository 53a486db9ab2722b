"""Every sampler behind one call, so the pipeline never changes when a sampler is added.

A sampler gets `predict_noise(latents, timestep) -> noise`, the U-Net with guidance applied, and walks from
pure noise (or a noised input image) to clean latents. Two families: the DDPM family (sd/sampling/ddpm.py) walks whole
training timesteps on the U-Net's own view of the latents; the k-diffusion family (sd/sampling/k_diffusion.py) walks noise
levels sigma, through a Denoiser. Each sampler's steps, starting noise and image-to-image start are those of
the diffusers scheduler of the same name with SD 1.5's configuration. For inpainting with an ordinary checkpoint,
a KnownRegion puts the input image's latents back outside the repainted area after every step: here, once for
every sampler, as diffusers' inpainting pipeline does after every scheduler step.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ddpm import AfterStep, NoisePredictor, sample_ddim, sample_ddpm, sample_plms
from ..errors import SDError
from .k_diffusion import Denoiser, sample_dpmpp_2m, sample_euler, sample_euler_ancestral, sample_heun, sample_lms, sample_unipc
from .schedule import SD15, SigmaSchedule, dpm_solver_schedule, euler_schedule, image_to_image_steps, leading_timesteps


@dataclass(frozen=True)
class KnownRegion:
    """The part of the latents an ordinary checkpoint must not repaint, and what it holds there."""

    latents: torch.Tensor  # (B, 4, h, w) the input image's clean latents
    repaint: torch.Tensor  # (1, 1, h, w) bool: True where the sampler generates, False where the image is kept

    def after_step(self, noised: Callable[[int], torch.Tensor], num_steps: int) -> AfterStep:
        """Puts the known latents back outside the repainted area after each step: `noised(j)` gives them at the
        level of step j, which x reaches after step j - 1; after the last step they are the clean latents."""

        def keep_known(i: int, x: torch.Tensor) -> torch.Tensor:
            known = self.latents if i == num_steps - 1 else noised(i + 1)
            return torch.where(self.repaint, x, known)

        return keep_known


@dataclass(frozen=True)
class TimestepSampler:
    """A DDPM-family sampler on SD 1.5's leading timesteps (981, 961, ..., 1 for 50 steps)."""

    function: Callable
    a1111_name: str
    final_timestep: int  # where the last step lands: -1, the clean image, or 0, the least noise trained on
    stochastic: bool = False  # draws fresh noise as it goes
    second_order = False

    def __call__(self, predict_noise, noise, timesteps, image_latents, known=None, **options) -> torch.Tensor:
        alpha_bars = torch.stack([SD15.alpha_bar(t) for t in [*timesteps.tolist(), self.final_timestep]])  # (n + 1,)
        # unit-variance noise is what the U-Net expects at its noisiest
        x = noise if image_latents is None else SD15.add_noise(image_latents, timesteps[0], noise)
        if known is not None:
            options["after_step"] = known.after_step(lambda j: SD15.add_noise(known.latents, timesteps[j], noise), len(timesteps))
        return self.function(predict_noise, x, timesteps, alpha_bars, **options)


@dataclass(frozen=True)
class SigmaSampler:
    """A k-diffusion-family sampler on its schedule of noise levels, optionally Karras's."""

    function: Callable
    a1111_name: str
    schedule: Callable[[int, bool], SigmaSchedule]
    # pure noise starts at the variance x0 + sigma * noise has, sigma^2 + 1, as diffusers' DPM-Solver and UniPC
    # start; else at sigma^2, leaving out x0's, as its Euler-type schedulers and k-diffusion start
    unit_variance_start: bool = False
    stochastic: bool = False  # draws fresh noise as it goes
    # A1111's "Automatic" schedule type for the sampler (since its 1.9), and what the command uses unless told
    karras_by_default: bool = False
    second_order: bool = False  # two U-Net calls a step

    def __call__(self, predict_noise, noise, schedule, image_latents, known=None, **options) -> torch.Tensor:
        sigma = schedule.sigmas[0]
        if image_latents is not None:
            x = image_latents + noise * sigma
        else:
            x = noise * ((sigma**2 + 1) ** 0.5 if self.unit_variance_start else sigma)
        if known is not None:
            options["after_step"] = known.after_step(lambda j: known.latents + noise * schedule.sigmas[j], len(schedule.sigmas) - 1)
        return self.function(Denoiser(predict_noise, schedule), x, schedule.sigmas, **options)


SAMPLERS = {
    "ddpm": TimestepSampler(sample_ddpm, "DDPM", final_timestep=-1, stochastic=True),
    "ddim": TimestepSampler(sample_ddim, "DDIM", final_timestep=0, stochastic=True),
    "pndm": TimestepSampler(sample_plms, "PLMS", final_timestep=0),
    "lms": SigmaSampler(sample_lms, "LMS", euler_schedule),
    "euler": SigmaSampler(sample_euler, "Euler", euler_schedule),
    "euler_a": SigmaSampler(sample_euler_ancestral, "Euler a", euler_schedule, stochastic=True),
    "heun": SigmaSampler(sample_heun, "Heun", euler_schedule, second_order=True),
    "dpmpp_2m": SigmaSampler(sample_dpmpp_2m, "DPM++ 2M", dpm_solver_schedule, unit_variance_start=True, karras_by_default=True),
    "unipc": SigmaSampler(sample_unipc, "UniPC", dpm_solver_schedule, unit_variance_start=True),
}


def display_name(name: str, karras: bool) -> str:
    """The sampler's name as AUTOMATIC1111 writes it in PNG metadata, e.g. "DPM++ 2M Karras"."""
    return SAMPLERS[name].a1111_name + " Karras" * karras


def total_steps(name: str, steps: int) -> int:
    """A pass's steps as A1111 counts them for prompt editing: in U-Net calls, so twice for a second-order sampler
    (its last step makes one call, so the count runs one past the calls made)."""
    return steps * (2 if SAMPLERS[name].second_order else 1)


def karras_by_default(name: str) -> bool:
    """Whether the sampler uses Karras's noise levels when nobody says: A1111's "Automatic" schedule. False for a
    name that is no sampler's, which Settings then refuses."""
    return getattr(SAMPLERS.get(name), "karras_by_default", False)


def sample(name: str, predict_noise: NoisePredictor, noise: torch.Tensor, steps: int, generator: torch.Generator, image_latents: torch.Tensor | None = None, strength: float = 1.0, progress: bool = True, karras: bool = False, eta: float = 0.0, known: KnownRegion | None = None, schedule_steps: int | None = None) -> torch.Tensor:
    """Clean latents (B, 4, h, w) from unit-variance `noise` of the same shape, or from `image_latents` noised
    to `strength` (image-to-image): the last `strength` share of `steps` run, or with `schedule_steps`, the last
    `steps` of a schedule of `schedule_steps` (A1111's hires fix). `karras` spaces a sigma sampler's steps as
    Karras et al. do; `eta` is DDIM's share of fresh noise. Extra noise the sampler needs comes from `generator`.
    With `known`, only its repainted area is generated: elsewhere the latents are held to its latents, noised
    with `noise` to each step's level."""
    sampler = SAMPLERS[name]
    check_options(name, karras, eta)
    length, start = (steps, 0) if image_latents is None else image_to_image_steps(steps, strength, schedule_steps)
    options = {"progress": progress}
    if sampler.stochastic:
        options["draw_noise"] = noise_source(generator)
    if name == "ddim":
        options["eta"] = eta
    if isinstance(sampler, SigmaSampler):
        schedule = sampler.schedule(length, karras).from_step(start)
        return sampler(predict_noise, noise, schedule, image_latents, known, **options)
    return sampler(predict_noise, noise, leading_timesteps(length)[start:], image_latents, known, **options)


def check_options(name: str, karras: bool, eta: float) -> None:
    """Refuses options the sampler has no use for, before any work."""
    if karras and not isinstance(SAMPLERS[name], SigmaSampler):
        sigma_samplers = ", ".join(key for key, sampler in SAMPLERS.items() if isinstance(sampler, SigmaSampler))
        raise SDError(f"karras sigmas need a sampler that walks noise levels, and {name} walks timesteps: use one of {sigma_samplers}, or leave karras off")
    if eta and name != "ddim":
        raise SDError(f"eta applies to the ddim sampler only, not {name}: use sampler ddim or leave eta at 0")
    if not 0 <= eta <= 1:
        raise SDError(f"eta must be between 0 (deterministic DDIM) and 1 (as much fresh noise as DDPM), got {eta}")


def noise_source(generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    def draw_noise(like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like `like`, drawn where the generator lives so that a seed gives the
        same image on every device, and in diffusers' order so that it gives diffusers' image."""
        noise = torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype)
        return noise.to(like.device)

    return draw_noise
