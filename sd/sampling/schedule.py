"""The noise schedule SD 1.5 was trained with, and the steps each sampler takes through it.

Two views of the same noisy latents: the U-Net's, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise at a training
timestep t, and k-diffusion's, x = x0 + sigma noise with sigma = sqrt((1 - abar) / abar), which is x_t / sqrt(abar_t).
Each schedule below reproduces the defaults of the diffusers scheduler named in it, for SD 1.5's configuration.
"""

from dataclasses import dataclass

import numpy as np
import torch

from sd.errors import SDError

# SD 1.5 samples timesteps 1 + k * stride ("leading" spacing, steps_offset 1)
STEPS_OFFSET = 1


@dataclass(frozen=True)
class NoiseSchedule:
    """How much noise the model saw at each training timestep t = 0 .. T-1."""

    betas: torch.Tensor  # (T,) variance of the noise added by training step t
    alphas_cumprod: torch.Tensor  # (T,) abar_t: the signal's variance left after steps 0 .. t

    @classmethod
    def scaled_linear(
        cls, num_training_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> "NoiseSchedule":
        # linear in sqrt(beta), the latent-diffusion schedule, computed in float32 as in training
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_training_steps, dtype=torch.float32) ** 2
        return cls(betas, torch.cumprod(1.0 - betas, dim=0))  # (T,), (T,)

    @property
    def num_training_steps(self) -> int:
        return len(self.betas)

    @property
    def sigmas(self) -> torch.Tensor:
        """(T,) the noise-to-signal ratio at each timestep, rising from 0.029 to 14.6 for SD 1.5."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    def alpha_bar(self, timestep: int) -> torch.Tensor:
        """abar at `timestep`; timestep -1 stands for the clean image, abar = 1."""
        return self.alphas_cumprod[timestep] if timestep >= 0 else torch.tensor(1.0)

    def add_noise(
        self, original_samples: torch.Tensor, timesteps: int | torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """The forward process: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, one timestep per sample or one for all."""
        alpha_bar = self.alphas_cumprod.to(original_samples.device)[torch.as_tensor(timesteps)]  # (B,) or ()
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        alpha_bar = alpha_bar.to(original_samples.dtype).reshape(shape)  # (B, 1, 1, 1)
        return alpha_bar.sqrt() * original_samples + (1 - alpha_bar).sqrt() * noise

    def sigma_at(self, timesteps: np.ndarray) -> np.ndarray:
        """sigma at (possibly fractional) timesteps, interpolated linearly in t."""
        return np.interp(timesteps, np.arange(self.num_training_steps), self.sigmas.numpy())

    def timestep_at(self, sigmas: np.ndarray) -> np.ndarray:
        """The fractional timestep of each sigma, interpolated linearly in log sigma (within the trained range)."""
        return np.interp(np.log(sigmas), np.log(self.sigmas.numpy()), np.arange(self.num_training_steps))


SD15 = NoiseSchedule.scaled_linear()


@dataclass(frozen=True)
class SigmaSchedule:
    """The noise levels a sigma sampler visits and the U-Net timestep it gives at each."""

    sigmas: torch.Tensor  # (n + 1,) float32, descending; the last is 0, the clean image
    timesteps: torch.Tensor  # (n,) one per sigma but the last, float32 or int64 as diffusers' scheduler has them

    def from_step(self, start: int) -> "SigmaSchedule":
        """The steps from `start` on: image-to-image skips the noisiest ones."""
        return SigmaSchedule(self.sigmas[start:], self.timesteps[start:])


def check_steps(num_steps: int, num_training_steps: int) -> None:
    # more steps would put the first leading timestep past the schedule's end, or give linspace schedules
    # two sigmas with the same whole timestep
    max_steps = num_training_steps - STEPS_OFFSET
    if not 1 <= num_steps <= max_steps:
        raise SDError(f"steps must be between 1 and {max_steps}, got {num_steps}")


def leading_timesteps(num_inference_steps: int, num_training_steps: int = 1000) -> torch.Tensor:
    """Descending timesteps, evenly `num_training_steps // num_inference_steps` apart, the last one 1: the
    spacing of DDPMScheduler, DDIMScheduler and PNDMScheduler."""
    check_steps(num_inference_steps, num_training_steps)
    stride = num_training_steps // num_inference_steps
    return torch.arange(num_inference_steps - 1, -1, -1, dtype=torch.long) * stride + STEPS_OFFSET  # (n,)


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """`num_steps` sigmas from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho) (Karras et al. 2022,
    eq. 5): more of the steps go to low noise, where the image's detail forms."""
    ramp = np.linspace(0, 1, num_steps)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def euler_schedule(num_steps: int, karras: bool = False, schedule: NoiseSchedule = SD15) -> SigmaSchedule:
    """The schedule of EulerDiscreteScheduler, also Heun's and LMS's: fractional timesteps evenly spaced from
    T - 1 down to 0 (999, 946.42, ..., 0 for 20 steps; a single step is the one at 0, nearly noise-free) at the
    sigmas interpolated there; with `karras`, Karras sigmas between the first and last of those and the
    fractional timesteps of those sigmas."""
    check_steps(num_steps, schedule.num_training_steps)
    timesteps = np.linspace(0, schedule.num_training_steps - 1, num_steps, dtype=np.float32)[::-1]  # (n,)
    sigmas = schedule.sigma_at(timesteps)  # (n,) float64
    if karras:
        sigmas = karras_sigmas(num_steps, sigmas[-1], sigmas[0])
        timesteps = schedule.timestep_at(sigmas)
    return SigmaSchedule(_append_zero(sigmas), torch.from_numpy(timesteps.astype(np.float32)))


def dpm_solver_schedule(num_steps: int, karras: bool = False, schedule: NoiseSchedule = SD15) -> SigmaSchedule:
    """The schedule of DPMSolverMultistepScheduler, also UniPC's: whole timesteps evenly spaced over `num_steps`
    intervals from T - 1 to 0, without the 0 the last interval ends on (999, 949, ..., 50 for 20 steps); with
    `karras`, Karras sigmas over the whole trained range and the nearest whole timestep of each."""
    check_steps(num_steps, schedule.num_training_steps)
    if karras:
        trained = schedule.sigmas
        sigmas = karras_sigmas(num_steps, trained[0].item(), trained[-1].item())
        timesteps = schedule.timestep_at(sigmas).round()
    else:
        timesteps = np.linspace(0, schedule.num_training_steps - 1, num_steps + 1).round()[::-1][:-1]  # (n,)
        sigmas = schedule.sigma_at(timesteps)
    return SigmaSchedule(_append_zero(sigmas), torch.from_numpy(timesteps.astype(np.int64)))


def _append_zero(sigmas: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))  # (n,) -> (n + 1,)


def first_step(num_steps: int, strength: float) -> int:
    """Where image-to-image starts: it runs the last `strength` share of the steps, and at least one."""
    if not 0.0 <= strength <= 1.0:
        raise SDError(f"strength must be between 0 and 1, got {strength}")
    # diffusers' img2img rounds the share of steps down the same way but may run none
    return min(num_steps - int(num_steps * strength), num_steps - 1)


def image_to_image_steps(steps: int, strength: float, schedule_steps: int | None = None) -> tuple[int, int]:
    """The length of image-to-image's schedule and the step it starts at: the last `strength` share of `steps`,
    or given `schedule_steps` (A1111's hires fix), the last `steps` of a schedule of that many."""
    if schedule_steps is None:
        return steps, first_step(steps, strength)
    if not 1 <= steps <= schedule_steps:
        raise SDError(f"cannot run {steps} steps of a schedule of {schedule_steps}: give between 1 and {schedule_steps}")
    return schedule_steps, schedule_steps - steps
