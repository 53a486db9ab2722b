"""Trains the demo model from scratch with our own modules at small sizes: first the VAE on drawn images,
then the U-Net and the text encoder together on the VAE's latents, with SD 1.5's noise schedule and objective.

`python -m sd.training.train` (or `make demo-model`) writes data/sd-demo.safetensors. The run saves its state
every few hundred steps and resumes from it when started again with the same settings.
"""

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import trange

from ..models.clip import CLIP, CLIPConfig
from ..models.decoder import Decoder
from ..models.unet import UNet, UNetConfig
from ..models.encoder import Encoder
from ..files import DEMO_CHECKPOINT
from ..files.converter import write_original_checkpoint
from ..sampling.schedule import SD15
from ..prompts.tokenizer import BOS_ID, EOS_ID, encode
from ..models.vae import VAEConfig
from .world import every_caption, random_batch, random_vae_batch



@dataclass(frozen=True)
class Cycle:
    """A stretch of the U-Net stage: the learning rate warms up linearly to `peak` over `warmup` steps, then decays
    along a cosine to a tenth of it at `steps`; the loss weights are capped at `loss_weight_cap` (None: uncapped)."""

    steps: int
    peak: float
    warmup: int
    loss_weight_cap: float | None


# Each pair of opposite words (left/right, top/bottom, circle/square) is learnt only once the model's paths for the
# two drift apart, suddenly and at a time set by chance; a pair still joined when the rate has decayed stays joined,
# and a warm restart parts it. Capped weights (1 + 1/SNR reaches 215 at t = 999, and t > 600 holds 94 % of the
# weight; capped at 5, 60 %) let the shapes' details, settled below t = 600, be learnt: uncapped, circle and square
# stayed one shape. Uncapped weights part the positions, chosen at high noise, fastest. README has the figures.
UNET_CYCLES = (Cycle(3000, 8e-4, 100, 5.0), Cycle(750, 4e-4, 50, 5.0), Cycle(750, 4e-4, 50, None))


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that decides the weights: the same config and seed give the same model."""

    seed: int = 0
    image_size: int = 64
    unet: UNetConfig = UNetConfig(base_width=48, width_multipliers=(1, 2, 2), attention_levels=(0, 1, 2), blocks_per_level=1,
                                  num_heads=4, context_width=64, num_groups=16, sample_size=8)
    vae: VAEConfig = VAEConfig(base_width=24, width_multipliers=(1, 2, 2, 2), blocks_per_level=1, num_groups=8)
    clip: CLIPConfig = CLIPConfig(width=64, num_layers=2, num_heads=2)
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_learning_rate: float = 1e-3  # 2e-3 diverged after 400 steps
    object_weight: float = 9.0  # extra weight of the objects' pixels in the VAE's loss (object_weights)
    kl_weight: float = 1e-6
    unet_cycles: tuple[Cycle, ...] = UNET_CYCLES
    unet_batch: int = 64
    warmup_steps: int = 100  # the VAE's
    prompt_dropout: float = 0.1  # captions replaced by "" so that the model also learns the unguided prediction
    # "v": the noise-prediction loss weighted by 1 + 1/SNR, as a v-prediction loss weighs it (capped by each cycle's
    # loss_weight_cap); "eps": unweighted
    loss_weighting: str = "v"
    latent_bank: int = 16384  # drawn images encoded once, before the U-Net stage, which samples its latents from them
    ema_decay: float = 0.995
    save_every: int = 250


@dataclass
class Run:
    """The state of a training run: what `save` writes and `resume` reads back."""

    config: TrainingConfig
    stage: str = "vae"  # "vae", then "unet", then "done"
    step: int = 0
    models: dict[str, nn.Module] = field(default_factory=dict)
    ema: dict[str, nn.Module] = field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)
    losses: list[float] = field(default_factory=list)


def text_token_ids() -> tuple[int, ...]:
    """The CLIP tokens of every caption of the world: the only rows the demo's text encoder keeps."""
    ids = {BOS_ID, EOS_ID}
    for row in encode(every_caption()).tolist():
        ids.update(row)
    return tuple(sorted(ids))


def build_models(config: TrainingConfig) -> dict[str, nn.Module]:
    torch.manual_seed(config.seed)
    clip_config = dataclasses.replace(config.clip, token_ids=text_token_ids())
    clip_config = dataclasses.replace(clip_config, vocab_size=len(clip_config.token_ids))
    models = {"clip": CLIP(clip_config), "encoder": Encoder(config.vae), "decoder": Decoder(config.vae), "diffusion": UNet(config.unet)}
    nn.init.normal_(models["clip"].token_embedding, std=0.02)
    nn.init.normal_(models["clip"].position_embedding, std=0.01)
    nn.init.zeros_(models["diffusion"].conv_out.weight)  # the first predictions are 0: a loss of 1, not more
    nn.init.zeros_(models["diffusion"].conv_out.bias)
    # channels_last kernels are what our layers compute with on a CPU; others would be copied on each call
    return {name: model.to(memory_format=torch.channels_last) for name, model in models.items()}


def train(config: TrainingConfig, state_path: Path, output: Path, progress: bool = True) -> Path:
    run = resume(config, state_path)
    if run.stage == "vae":
        train_vae(run, state_path, progress)
        set_latent_scale(run)
        start_unet(run)
        save(run, state_path)
    if run.stage == "unet":
        train_unet(run, state_path, progress)
        run.stage = "done"
        save(run, state_path)
    export(run, output)
    return output


def train_vae(run: Run, state_path: Path, progress: bool) -> None:
    config = run.config
    encoder, decoder = run.models["encoder"], run.models["decoder"]
    run.optimizer = run.optimizer or vae_optimizer(run)
    bar = trange(run.step, config.vae_steps, desc="VAE", disable=not progress, initial=run.step, total=config.vae_steps)
    for run.step in bar:
        images, covered = random_vae_batch(config.vae_batch, run.generator, config.image_size)
        set_learning_rate(run, run.step, config.vae_learning_rate, config.vae_steps, config.warmup_steps)
        # (B, 3, S, S) -> (B, 8, S / 8, S / 8): the posterior's mean and log-variance
        mean, log_variance = encoder.moments(images)
        latents = mean + torch.exp(0.5 * log_variance) * torch.randn(mean.shape, generator=run.generator)
        reconstruction = decoder(latents * encoder.scale_factor)
        error = (reconstruction - images).abs()
        kl = 0.5 * (mean**2 + log_variance.exp() - 1 - log_variance).mean()
        loss = (object_weights(covered, config.object_weight) * (error + error**2)).mean() + config.kl_weight * kl
        step_optimizer(run, loss)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        save_if_due(run, state_path)
    run.step = config.vae_steps


def object_weights(covered: torch.Tensor, weight: float) -> torch.Tensor:
    """1 on the background, 1 + `weight` on the objects and a pixel around them: the background, most of the
    image and learnt in a few steps, would otherwise outweigh the edges and colours that the rules read."""
    near = F.max_pool2d((covered > 0).float(), 3, stride=1, padding=1)  # (B, 1, S, S)
    return 1 + weight * near


def vae_optimizer(run: Run) -> torch.optim.Optimizer:
    parameters = [*run.models["encoder"].parameters(), *run.models["decoder"].parameters()]
    return torch.optim.AdamW(parameters, lr=run.config.vae_learning_rate, weight_decay=0.0)


@torch.no_grad()
def set_latent_scale(run: Run, samples: int = 512) -> None:
    """Sets the VAE's scale factor so that the U-Net's latents have unit variance, as SD's 0.18215 does."""
    images, _ = random_batch(samples, run.generator, run.config.image_size)
    mean, log_variance = run.models["encoder"].moments(images)
    latents = mean + torch.exp(0.5 * log_variance) * torch.randn(mean.shape, generator=run.generator)
    scale = float(1 / latents.std())
    for name in ("encoder", "decoder"):
        run.models[name].scale_factor = scale


def start_unet(run: Run) -> None:
    run.stage, run.step = "unet", 0
    parameters = [*run.models["diffusion"].parameters(), *run.models["clip"].parameters()]
    run.optimizer = torch.optim.AdamW(parameters, lr=run.config.unet_cycles[0].peak, weight_decay=0.01)
    run.ema = {name: copy_of(run.models[name]) for name in ("diffusion", "clip")}
    run.losses = []


@dataclass(frozen=True)
class LatentBank:
    """The VAE's posterior of a fixed set of drawn images, scaled to unit variance: encoding them once costs
    less than encoding each batch (the encoder takes a quarter of a U-Net step)."""

    mean: torch.Tensor  # (N, 4, S / 8, S / 8)
    std: torch.Tensor
    captions: list[str]

    def sample(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        picks = torch.randint(len(self.captions), (size,), generator=generator)
        mean, std = self.mean[picks], self.std[picks]
        return mean + std * torch.randn(mean.shape, generator=generator), [self.captions[i] for i in picks.tolist()]


@torch.no_grad()
def encode_bank(run: Run, chunk: int = 256) -> LatentBank:
    """The same bank for a new and a resumed run: its images come from their own generator, seeded by the config."""
    generator = torch.Generator().manual_seed(run.config.seed + 1)
    encoder = run.models["encoder"]
    means, stds, captions = [], [], []
    for start in range(0, run.config.latent_bank, chunk):
        images, texts = random_batch(min(chunk, run.config.latent_bank - start), generator, run.config.image_size)
        mean, log_variance = encoder.moments(images)  # (B, 3, S, S) -> 2 x (B, 4, S / 8, S / 8)
        means.append(mean * encoder.scale_factor)
        stds.append(torch.exp(0.5 * log_variance.clamp(-30.0, 20.0)) * encoder.scale_factor)
        captions += texts
    return LatentBank(torch.cat(means), torch.cat(stds), captions)


def train_unet(run: Run, state_path: Path, progress: bool) -> None:
    config = run.config
    unet, clip = run.models["diffusion"], run.models["clip"]
    bank = encode_bank(run)
    token_cache: dict[str, list[int]] = {}
    alphas_cumprod = SD15.alphas_cumprod
    total = sum(cycle.steps for cycle in config.unet_cycles)
    bar = trange(run.step, total, desc="U-Net", disable=not progress, initial=run.step, total=total)
    for run.step in bar:
        latents, captions = bank.sample(config.unet_batch, run.generator)  # (B, 4, S / 8, S / 8), unit variance
        dropped = torch.rand(len(captions), generator=run.generator) < config.prompt_dropout
        captions = ["" if drop else caption for caption, drop in zip(captions, dropped.tolist())]
        noise = torch.randn(latents.shape, generator=run.generator)
        timesteps = torch.randint(0, SD15.num_training_steps, (latents.shape[0],), generator=run.generator)
        noisy = SD15.add_noise(latents, timesteps, noise)
        context = clip(tokens(captions, token_cache))
        cycle, step = cycle_at(config.unet_cycles, run.step)
        set_learning_rate(run, step, cycle.peak, cycle.steps, cycle.warmup)
        predicted = unet(noisy, context, timesteps)
        errors = (predicted - noise).pow(2).mean(dim=(1, 2, 3))  # (B,)
        loss = (errors * loss_weights(timesteps, alphas_cumprod, config.loss_weighting, cycle.loss_weight_cap)).mean()
        step_optimizer(run, loss)
        update_ema(run)
        run.losses.append(errors.mean().item())
        bar.set_postfix(loss=f"{sum(run.losses[-50:]) / len(run.losses[-50:]):.4f}")
        save_if_due(run, state_path)
    run.step = total


def loss_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, weighting: str, cap: float | None = None) -> torch.Tensor:
    """The weight of each sample's noise-prediction error.

    Unweighted ("eps"), the error in the clean image that a noise prediction implies counts SNR = abar / (1 - abar)
    times: 0.005 at t = 999, where nothing of the image is left but the layout the text must choose. The model
    then learns to read the layout off the faint signal left in the noise, and at generation, where the noise
    holds none, off the noise. Weighted by 1 + 1/SNR ("v", the weighting of a v-prediction loss), the clean
    image's error counts SNR + 1 times: at least once at every timestep. `cap`, where given, bounds the weights
    (UNET_CYCLES says why).
    """
    if weighting == "eps":
        return torch.ones(timesteps.shape)
    alpha_bar = alphas_cumprod[timesteps]
    weights = 1 + (1 - alpha_bar) / alpha_bar
    return weights if cap is None else weights.clamp(max=cap)


def tokens(captions: list[str], cache: dict[str, list[int]]) -> torch.Tensor:
    missing = [caption for caption in set(captions) if caption not in cache]
    if missing:
        cache.update(zip(missing, encode(missing).tolist()))
    return torch.tensor([cache[caption] for caption in captions])  # (B, 77)


def cycle_at(cycles: tuple[Cycle, ...], step: int) -> tuple[Cycle, int]:
    """The cycle that the U-Net stage's `step` falls in, and the step within it."""
    for cycle in cycles:
        if step < cycle.steps:
            return cycle, step
        step -= cycle.steps
    raise ValueError("step beyond the last cycle")


def set_learning_rate(run: Run, step: int, peak: float, steps: int, warmup: int) -> None:
    """Linear warm-up over `warmup` steps, then a cosine decay to a tenth of the peak at `steps`."""
    if step < warmup:
        rate = peak * (step + 1) / warmup
    else:
        progress = (step - warmup) / max(1, steps - warmup)
        rate = peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    for group in run.optimizer.param_groups:
        group["lr"] = rate


def step_optimizer(run: Run, loss: torch.Tensor) -> None:
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_([p for group in run.optimizer.param_groups for p in group["params"]], 1.0)
    run.optimizer.step()


@torch.no_grad()
def update_ema(run: Run) -> None:
    """The shipped weights: an exponential moving average, which samples better than the last step's."""
    decay = min(run.config.ema_decay, (1 + run.step) / (10 + run.step))
    for name, average in run.ema.items():
        for kept, current in zip(average.parameters(), run.models[name].parameters()):
            kept.lerp_(current, 1 - decay)


def copy_of(model: nn.Module) -> nn.Module:
    copy = type(model)(model.config).to(memory_format=torch.channels_last)
    copy.load_state_dict(model.state_dict())
    return copy.requires_grad_(False)


def save_if_due(run: Run, path: Path) -> None:
    """Saves every save_every steps, as the state after the step just taken (a resumed run starts at the next)."""
    if (run.step + 1) % run.config.save_every == 0:
        run.step += 1
        save(run, path)
        run.step -= 1


def save(run: Run, path: Path) -> None:
    """Writes the run's state atomically (a stopped run resumes from the last one)."""
    state = {
        "config": json.dumps(dataclasses.asdict(run.config)), "stage": run.stage, "step": run.step,
        "models": {name: model.state_dict() for name, model in run.models.items()},
        "ema": {name: model.state_dict() for name, model in run.ema.items()},
        "scale_factor": run.models["encoder"].scale_factor,
        "optimizer": run.optimizer.state_dict() if run.optimizer is not None else None,
        "generator": run.generator.get_state(), "losses": torch.tensor(run.losses),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    temporary.replace(path)


def resume(config: TrainingConfig, path: Path) -> Run:
    """The saved run if `path` holds one made with `config`, else a new run seeded with config.seed."""
    run = Run(config, models=build_models(config))
    run.generator.manual_seed(config.seed)
    if not path.is_file():
        return run
    state = torch.load(path, weights_only=True)
    if state["config"] != json.dumps(dataclasses.asdict(config)):
        raise SystemExit(f"{path} holds a run with other settings: delete it to start afresh")
    run.stage, run.step = state["stage"], state["step"]
    for name, model in run.models.items():
        model.load_state_dict(state["models"][name])
    for name in ("encoder", "decoder"):
        run.models[name].scale_factor = state["scale_factor"]
    if run.stage != "vae":
        start_unet(run)
        run.step = state["step"]
        for name, model in run.ema.items():
            model.load_state_dict(state["ema"][name])
    elif state["optimizer"] is not None:
        run.optimizer = vae_optimizer(run)
    if state["optimizer"] is not None:
        run.optimizer.load_state_dict(state["optimizer"])
    run.generator.set_state(state["generator"])
    run.losses = state["losses"].tolist()
    print(f"resumed {path}: {run.stage} step {run.step}")
    return run


def trained_models(run: Run) -> dict[str, nn.Module]:
    """The models to sample with: the VAE as trained, the U-Net and text encoder averaged (EMA)."""
    models = {**run.models, **run.ema}
    return {name: model.eval().requires_grad_(False) for name, model in models.items()}


def export(run: Run, output: Path) -> None:
    """Writes the demo checkpoint: fp16 tensors under the original CompVis names, the configs in the metadata."""
    models = trained_models(run)
    configs = {
        "unet": dataclasses.asdict(models["diffusion"].config),
        "vae": dataclasses.asdict(dataclasses.replace(run.config.vae, scale_factor=models["encoder"].scale_factor)),
        "clip": dataclasses.asdict(models["clip"].config),
    }
    state = {f"{name}.{key}": value for name, model in models.items() for key, value in model.state_dict().items()}
    description = "sd demo model: one coloured shape on a plain background, trained by sd/training (make demo-model)"
    write_original_checkpoint(state, output, torch.float16, {"sd_config": json.dumps(configs), "description": description})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEMO_CHECKPOINT)
    parser.add_argument("--state", type=Path, default=Path("build/demo-training/state.pt"), help="the resumable state")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override TrainingConfig fields")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    config = TrainingConfig(**{name: value if name == "loss_weighting" else json.loads(value) for name, value in overrides.items()})
    started = time.perf_counter()
    train(config, args.state, args.output)
    print(f"wrote {args.output} in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
