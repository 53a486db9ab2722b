"""The noise schedule SD 1.5 was trained with, and the inference timesteps every sampler walks."""

from dataclasses import dataclass

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


def leading_timesteps(num_inference_steps: int, num_training_steps: int = 1000) -> torch.Tensor:
    """Descending timesteps, evenly `num_training_steps // num_inference_steps` apart, the last one 1."""
    # more steps would put the first timestep at num_training_steps, past the schedule's end
    max_steps = num_training_steps - STEPS_OFFSET
    if not 1 <= num_inference_steps <= max_steps:
        raise SDError(f"steps must be between 1 and {max_steps}, got {num_inference_steps}")
    stride = num_training_steps // num_inference_steps
    return torch.arange(num_inference_steps - 1, -1, -1, dtype=torch.long) * stride + STEPS_OFFSET  # (n,)


def timesteps_for_strength(timesteps: torch.Tensor, strength: float) -> torch.Tensor:
    """The last `strength` share of `timesteps`, at least one: image-to-image starts from a partly noised image."""
    if not 0.0 <= strength <= 1.0:
        raise SDError(f"strength must be between 0 and 1, got {strength}")
    num_steps = len(timesteps)
    start = min(num_steps - int(num_steps * strength), num_steps - 1)
    return timesteps[start:]
