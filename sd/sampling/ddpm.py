"""The DDPM family: samplers that walk whole training timesteps on the latents as the U-Net sees them,
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, from its noise estimate.

Each takes `predict_noise(x_t, t)`, the latents at the first timestep, the `timesteps` (n,) to visit and
`alpha_bars` (n + 1,): abar at each of them and after the last step, and returns the latents after the last step.
Each hands the latents after step i to `after_step(i, x)` and goes on with what it returns (inpainting puts the
known part of the image back there); a trial step that lands on the same level is handed over too.
"""

from collections.abc import Callable

import torch
from tqdm.auto import trange

NoisePredictor = Callable[[torch.Tensor, float], torch.Tensor]  # (latents as the U-Net sees them, timestep) -> noise
NoiseSource = Callable[[torch.Tensor], torch.Tensor]  # standard normal noise shaped like its argument
AfterStep = Callable[[int, torch.Tensor], torch.Tensor]  # (step index i, latents after step i) -> latents to go on with


def unchanged(i: int, x: torch.Tensor) -> torch.Tensor:
    return x


def predict_original(x: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The clean latents implied by the noise estimate (Ho et al. 2020, eq. 15)."""
    return (x - (1 - alpha_bar).sqrt() * noise) / alpha_bar.sqrt()


def ddim_step(x: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, alpha_bar_next: torch.Tensor, std: torch.Tensor | float = 0.0) -> torch.Tensor:
    """x at the next noise level: the predicted x0 there plus the estimated noise, less the `std` of fresh noise
    the caller adds (Song et al. 2021, eq. 12)."""
    return alpha_bar_next.sqrt() * predict_original(x, noise, alpha_bar) + (1 - alpha_bar_next - std**2).sqrt() * noise


def sample_ddpm(predict_noise: NoisePredictor, x: torch.Tensor, timesteps: torch.Tensor, alpha_bars: torch.Tensor, draw_noise: NoiseSource, progress: bool = True, after_step: AfterStep = unchanged) -> torch.Tensor:
    """DDPM (Ho et al. 2020): each step draws x at the next timestep from the posterior q(x_next | x_t, x0) around
    the predicted x0, with its "fixed small" variance."""
    for i in trange(len(timesteps), disable=not progress):
        alpha_bar, alpha_bar_next = alpha_bars[i], alpha_bars[i + 1]
        # alpha and beta of the whole stride, which spans several training steps
        alpha = alpha_bar / alpha_bar_next
        beta = 1 - alpha
        original = predict_original(x, predict_noise(x, timesteps[i].item()), alpha_bar)  # (B, 4, h, w)
        # the posterior's mean (eq. 7) and variance; the variance is 0 on the last step, which lands on the
        # clean image, but the draw is kept so the generator stays in step with diffusers'
        original_coeff = alpha_bar_next.sqrt() * beta / (1 - alpha_bar)
        latents_coeff = alpha.sqrt() * (1 - alpha_bar_next) / (1 - alpha_bar)
        variance = (1 - alpha_bar_next) / (1 - alpha_bar) * beta
        x = original_coeff * original + latents_coeff * x + variance.sqrt() * draw_noise(x)  # (B, 4, h, w)
        x = after_step(i, x)
    return x


def sample_ddim(predict_noise: NoisePredictor, x: torch.Tensor, timesteps: torch.Tensor, alpha_bars: torch.Tensor, draw_noise: NoiseSource, eta: float = 0.0, progress: bool = True, after_step: AfterStep = unchanged) -> torch.Tensor:
    """DDIM (Song et al. 2021): deterministic steps along the noise estimate for eta 0; eta 1 draws as much fresh
    noise as DDPM's posterior, which it then equals."""
    for i in trange(len(timesteps), disable=not progress):
        alpha_bar, alpha_bar_next = alpha_bars[i], alpha_bars[i + 1]
        noise = predict_noise(x, timesteps[i].item())  # (B, 4, h, w)
        # eq. 16: the standard deviation of the fresh noise, eta times that of DDPM's posterior
        std = eta * ((1 - alpha_bar_next) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_next)).sqrt()
        x = ddim_step(x, noise, alpha_bar, alpha_bar_next, std)
        if eta > 0:
            x = x + std * draw_noise(x)
        x = after_step(i, x)
    return x


# Adams-Bashforth weights of orders 1 to 4 for the last noise estimates, newest first
ADAMS_BASHFORTH = [[1.0], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24]]


def sample_plms(predict_noise: NoisePredictor, x: torch.Tensor, timesteps: torch.Tensor, alpha_bars: torch.Tensor, progress: bool = True, after_step: AfterStep = unchanged) -> torch.Tensor:
    """PLMS (Liu et al. 2022, pseudo linear multistep; SD's original default): DDIM steps along an Adams-Bashforth
    blend of the last four noise estimates, fourth order at one model call a step.

    The first step has no history: it averages its estimate with one at the end of a trial DDIM step (a second
    model call, as in diffusers' PNDMScheduler with skip_prk_steps), unless it is also the last."""
    history = []  # noise estimates of the last three steps, oldest first
    for i in trange(len(timesteps), disable=not progress):
        alpha_bar, alpha_bar_next = alpha_bars[i], alpha_bars[i + 1]
        noise = predict_noise(x, timesteps[i].item())  # (B, 4, h, w)
        if not history and i + 1 < len(timesteps):
            trial = after_step(i, ddim_step(x, noise, alpha_bar, alpha_bar_next))
            blend = (noise + predict_noise(trial, timesteps[i + 1].item())) / 2
        else:
            recent = [noise, *reversed(history)]
            blend = sum(weight * estimate for weight, estimate in zip(ADAMS_BASHFORTH[len(recent) - 1], recent))
        history = [*history, noise][-3:]
        x = after_step(i, ddim_step(x, blend, alpha_bar, alpha_bar_next))
    return x
