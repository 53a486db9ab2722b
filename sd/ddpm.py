"""The DDPM sampler (Ho et al. 2020) with SD 1.5's settings: ancestral steps through the posterior."""

import torch

from sd.schedule import STEPS_OFFSET, NoiseSchedule, leading_timesteps, timesteps_for_strength


class DDPMSampler:
    """Each step predicts the clean latents from the model's noise estimate, then draws the latents of the
    previous timestep from the posterior q(x_prev | x_t, x0); the noise comes from `generator`."""

    def __init__(
        self,
        generator: torch.Generator,
        num_training_steps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
    ):
        self.generator = generator
        self.schedule = NoiseSchedule.scaled_linear(num_training_steps, beta_start, beta_end)
        self.set_inference_timesteps(50)

    def set_inference_timesteps(self, num_inference_steps: int = 50) -> None:
        """Walk `num_inference_steps` evenly spaced timesteps, e.g. 981, 961, ..., 1 for 50."""
        self.timesteps = leading_timesteps(num_inference_steps, self.schedule.num_training_steps)  # (n,)
        self.num_inference_steps = num_inference_steps
        self.stride = self.schedule.num_training_steps // num_inference_steps

    def set_strength(self, strength: float) -> None:
        """For image-to-image: keep only the last `strength` share of the steps (at least one)."""
        all_timesteps = leading_timesteps(self.num_inference_steps, self.schedule.num_training_steps)
        self.timesteps = timesteps_for_strength(all_timesteps, strength)

    def add_noise(
        self, original_samples: torch.Tensor, timesteps: int | torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Noise clean latents up to `timesteps` (one per sample, or one for the batch)."""
        return self.schedule.add_noise(original_samples, timesteps, noise)

    def step(
        self,
        timestep: int,
        latents: torch.Tensor,
        model_output: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Latents at the previous timestep, from those at `timestep` and the predicted noise `model_output`.

        `noise` replaces the draw from the generator (for tests)."""
        timestep = int(timestep)
        alpha_bar = self.schedule.alpha_bar(timestep)
        alpha_bar_prev = self.schedule.alpha_bar(self.previous_timestep(timestep))
        # alpha and beta of the whole stride t -> prev, which spans several training steps
        alpha = alpha_bar / alpha_bar_prev
        beta = 1 - alpha

        # x0 implied by the predicted noise (Ho et al. eq. 15)
        pred_original = (latents - (1 - alpha_bar).sqrt() * model_output) / alpha_bar.sqrt()  # (B, 4, H, W)
        # mean of the posterior q(x_prev | x_t, x0) (eq. 7)
        original_coeff = alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)
        latents_coeff = alpha.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)
        prev_latents = original_coeff * pred_original + latents_coeff * latents  # (B, 4, H, W)
        if timestep == 0:
            return prev_latents

        # the posterior's variance ("fixed_small"); it is 0 on the last step, where the clamp leaves
        # a negligible draw that keeps the generator in step with diffusers'
        variance = ((1 - alpha_bar_prev) / (1 - alpha_bar) * beta).clamp(min=1e-20)
        if noise is None:
            noise = self.draw_noise(model_output)
        return prev_latents + variance.sqrt() * noise  # (B, 4, H, W)

    def previous_timestep(self, timestep: int) -> int:
        """The next timestep to visit, or -1 (the clean image) after the last one."""
        prev = timestep - self.stride
        # the last timestep is 1 (STEPS_OFFSET); below it, with a stride of 1, would be 0, not the clean image
        return prev if prev >= STEPS_OFFSET else -1

    def draw_noise(self, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like `like`, drawn where the generator lives so a seed gives the
        same image on every device."""
        noise = torch.randn(like.shape, generator=self.generator, device=self.generator.device, dtype=like.dtype)
        return noise.to(like.device)
