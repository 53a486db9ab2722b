"""The k-diffusion family: samplers that walk noise levels sigma on x = x0 + sigma * noise (Karras et al. 2022).

Each takes `model(x, sigma) -> x0`, a Denoiser, the latents at sigmas[0] and the sigmas (n + 1,) to visit, the
last 0, and returns the clean latents. The model is only asked at the schedule's own sigmas. Each hands the
latents after step i, at sigmas[i + 1], to `after_step(i, x)` and goes on with what it returns, as in sd/sampling/ddpm.py.
"""

from collections.abc import Callable

import numpy as np
import torch
from numpy.polynomial import Polynomial
from tqdm.auto import trange

from sd.sampling.ddpm import AfterStep, NoisePredictor, NoiseSource, unchanged
from sd.sampling.schedule import SigmaSchedule

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma) -> estimated x0, a Denoiser


class Denoiser:
    """The U-Net's noise prediction turned into an estimate of the clean latents x0 = x - sigma * noise.

    The U-Net sees x at unit variance, x / sqrt(sigma^2 + 1), and the schedule's timestep for sigma: diffusers'
    schedules space and round those their own way, so they are looked up rather than computed from sigma.
    """

    def __init__(self, predict_noise: NoisePredictor, schedule: SigmaSchedule):
        self.predict_noise = predict_noise
        self.timesteps = dict(zip(schedule.sigmas.tolist(), schedule.timesteps.tolist()))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        noise = self.predict_noise(x / (sigma**2 + 1) ** 0.5, self.timesteps[sigma.item()])  # (B, 4, h, w)
        return x - sigma * noise


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE: the noise in x per unit of sigma."""
    return (x - denoised) / sigma


def sample_euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, progress: bool = True, after_step: AfterStep = unchanged) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    for i in trange(len(sigmas) - 1, disable=not progress):
        d = to_d(x, sigmas[i], model(x, sigmas[i]))  # (B, 4, h, w)
        x = after_step(i, x + d * (sigmas[i + 1] - sigmas[i]))
    return x


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a step to sigma_next into a deterministic one down to sigma_down and fresh noise of sigma_up, with
    sigma_down^2 + sigma_up^2 = sigma_next^2: the noise DDPM's posterior would add over the step."""
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def sample_euler_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor, draw_noise: NoiseSource, progress: bool = True, after_step: AfterStep = unchanged) -> torch.Tensor:
    """Euler steps that overshoot to sigma_down, then add fresh noise back up to the next sigma: the result
    forgets earlier noise, so it changes with the step count."""
    for i in trange(len(sigmas) - 1, disable=not progress):
        d = to_d(x, sigmas[i], model(x, sigmas[i]))  # (B, 4, h, w)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        x = x + d * (sigma_down - sigmas[i])
        # one draw per step, the last (sigma_up 0) included, as diffusers draws
        x = after_step(i, x + draw_noise(x) * sigma_up)
    return x


def sample_heun(model: Model, x: torch.Tensor, sigmas: torch.Tensor, progress: bool = True, after_step: AfterStep = unchanged) -> torch.Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 1): an Euler step, corrected by the mean of the slopes at its
    start and end, at two model calls a step; the last step, to sigma 0, stays an Euler step."""
    for i in trange(len(sigmas) - 1, disable=not progress):
        d = to_d(x, sigmas[i], model(x, sigmas[i]))  # (B, 4, h, w)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            # the Euler step ends at sigmas[i + 1] too: handed over before the model is asked there, as in diffusers
            x_euler = after_step(i, x + d * dt)
            d_end = to_d(x_euler, sigmas[i + 1], model(x_euler, sigmas[i + 1]))
            x = x + (d + d_end) / 2 * dt
        x = after_step(i, x)
    return x


def lms_coefficients(sigmas: torch.Tensor, i: int, order: int) -> list[float]:
    """The weights of the last `order` slopes, newest first, for the step from sigmas[i] to sigmas[i + 1]: the
    integrals over the step of the Lagrange polynomials through the sigmas those slopes were taken at."""
    nodes = sigmas[i - order + 1 : i + 1].flip(0).double().numpy()  # (order,) sigma_i, sigma_{i-1}, ...
    start, end = sigmas[i].item(), sigmas[i + 1].item()
    weights = []
    for j, node in enumerate(nodes):
        basis = Polynomial([1.0])  # 1 at this node, 0 at the others
        for other in np.delete(nodes, j):
            basis *= Polynomial([-other, 1.0]) / (node - other)
        integral = basis.integ()
        weights.append(float(integral(end) - integral(start)))
    return weights


def sample_lms(model: Model, x: torch.Tensor, sigmas: torch.Tensor, order: int = 4, progress: bool = True, after_step: AfterStep = unchanged) -> torch.Tensor:
    """Linear multistep: integrate the polynomial through the last `order` slopes over each step (Adams-Bashforth
    on the uneven sigma grid); the first steps use the slopes they have."""
    slopes = []  # the last `order` slopes, oldest first
    for i in trange(len(sigmas) - 1, disable=not progress):
        slopes = [*slopes, to_d(x, sigmas[i], model(x, sigmas[i]))][-order:]
        weights = lms_coefficients(sigmas, i, len(slopes))
        x = after_step(i, x + sum(weight * slope for weight, slope in zip(weights, reversed(slopes))))
    return x


def exponential_step(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The ODE's exact solution from sigma to sigma_next if x0 stayed `denoised` (DPM-Solver++'s first-order step,
    DDIM's): x0 + (sigma_next / sigma) (x - x0), written with the step h in lambda = -log sigma."""
    h = sigma.log() - sigma_next.log()
    return sigma_next / sigma * x - torch.expm1(-h) * denoised


def extrapolate_to_midpoint(denoised: torch.Tensor, previous: torch.Tensor, r: float | torch.Tensor) -> torch.Tensor:
    """x0 extrapolated linearly in lambda to the middle of this step from this step's estimate and the previous
    step's, with r the previous step over this one in lambda: DPM-Solver++(2M)'s second order."""
    return denoised + (denoised - previous) / (2 * r)


def sample_dpmpp_2m(model: Model, x: torch.Tensor, sigmas: torch.Tensor, progress: bool = True, after_step: AfterStep = unchanged) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): exact integration of the ODE's linear part in lambda = -log sigma, with
    x0 extrapolated from the last two estimates. First order on the first step (no history) and the last (to
    sigma 0, where lambda is infinite)."""
    lambdas = -sigmas.log()  # (n + 1,) the last is inf: sigma 0
    previous = None  # x0 estimate of the previous step
    for i in trange(len(sigmas) - 1, disable=not progress):
        denoised = model(x, sigmas[i])  # (B, 4, h, w)
        if previous is None or sigmas[i + 1] == 0:
            blend = denoised
        else:
            blend = extrapolate_to_midpoint(denoised, previous, (lambdas[i] - lambdas[i - 1]) / (lambdas[i + 1] - lambdas[i]))
        x = after_step(i, exponential_step(x, sigmas[i], sigmas[i + 1], blend))
        previous = denoised
    return x


def unipc_corrector_blend(denoised: list[torch.Tensor], lambdas: torch.Tensor, i: int) -> torch.Tensor:
    """The x0 blend that redoes step i - 1 -> i once the model has estimated x0 at i too (denoised[-1]).

    After a first-order step, the trapezoid rule. After a second-order one, UniPC-2's corrector (Zhao et al.
    2023, with B(h) = e^h - 1, "bh2"): weights rho_0 for the slope from the estimate before and rho_1 for the slope
    to the new one, which solve rho_0 + rho_1 = b_1 and -r rho_0 + rho_1 = b_2, with r the step before over this
    one in lambda, b_k = k! phi_{k+1}(-h) / phi_1(-h) and phi_{k+1}(z) = (phi_k(z) - 1 / k!) / z. In float64,
    as b_2 loses most of its digits to cancellation for small h.
    """
    if i == 1:
        return (denoised[-2] + denoised[-1]) / 2
    h = (lambdas[i] - lambdas[i - 1]).item()
    r = (lambdas[i - 1] - lambdas[i - 2]).item() / h
    z = -h
    phi_1 = np.expm1(z) / z
    phi_2 = (phi_1 - 1) / z
    phi_3 = (phi_2 - 1 / 2) / z
    b_1, b_2 = phi_2 / phi_1, 2 * phi_3 / phi_1
    rho_0 = float((b_1 - b_2) / (1 + r))
    rho_1 = float(b_1) - rho_0
    return denoised[-2] + rho_0 * (denoised[-2] - denoised[-3]) / r + rho_1 * (denoised[-1] - denoised[-2])


def sample_unipc(model: Model, x: torch.Tensor, sigmas: torch.Tensor, progress: bool = True, after_step: AfterStep = unchanged) -> torch.Tensor:
    """UniPC (Zhao et al. 2023), order 2 with "bh2", diffusers' defaults. Every step is the exponential-integrator
    step of DPM-Solver++ from a blend of x0 estimates. The predictor blends this step's and the previous one's
    (as DPM-Solver++(2M)); once the model has estimated x0 at the predicted point, the corrector redoes the step
    with that estimate in the blend too, at no extra model call (the next predictor reuses it). First order on the
    first step and the last, as for DPM-Solver++(2M)."""
    n = len(sigmas) - 1
    lambdas = -sigmas.double().log()  # (n + 1,) the last is inf: sigma 0
    denoised = []  # the last three x0 estimates, oldest first
    step_start = x  # where the previous step started, for the corrector to redo it from
    for i in trange(n, disable=not progress):
        denoised = [*denoised, model(x, sigmas[i])][-3:]
        if i > 0:
            x = exponential_step(step_start, sigmas[i - 1], sigmas[i], unipc_corrector_blend(denoised, lambdas, i))
        step_start = x
        if i == 0 or i == n - 1:
            blend = denoised[-1]
        else:
            r = ((lambdas[i] - lambdas[i - 1]) / (lambdas[i + 1] - lambdas[i])).item()
            blend = extrapolate_to_midpoint(denoised[-1], denoised[-2], r)
        # the corrected latents above are not handed over, as in diffusers' UniPC: only the step taken from them
        x = after_step(i, exponential_step(x, sigmas[i], sigmas[i + 1], blend))
    return x
