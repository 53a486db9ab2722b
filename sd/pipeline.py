"""`generate()`: text (and optionally an image) in, images out."""

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .errors import SDError
from .model_loader import load_models
from .samplers import SAMPLERS, check_options, sample
from .schedule import SD15, check_steps
from .tokenizer import encode

log = logging.getLogger("sd")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LATENT_FACTOR = 8  # the VAE shrinks each side 8 times
DEFAULT_CHECKPOINTS = [Path(__file__).resolve().parent.parent / "data" / f"v1-5-pruned-emaonly{suffix}" for suffix in (".safetensors", ".ckpt")]

# The models of the last checkpoint loaded, reused by later calls: (path, device, dtype) -> models.
_loaded: dict[tuple, dict[str, torch.nn.Module]] = {}


def generate(
    prompt: str,
    negative_prompt: str = "",
    input_image: Image.Image | str | Path | None = None,
    strength: float = 0.8,
    cfg_scale: float = 7.5,
    sampler: str = "ddpm",
    steps: int = 50,
    seed: int | None = None,
    width: int = 512,
    height: int = 512,
    num_images: int = 1,
    models: dict[str, torch.nn.Module] | None = None,
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    idle_device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    latents: torch.Tensor | None = None,
    progress: bool = True,
    karras: bool = False,
    eta: float = 0.0,
) -> list[Image.Image]:
    """Renders `num_images` images of `prompt`; with `input_image`, redraws that image (image-to-image).

    Each image's `info["sd"]` holds the settings that made it, the seed included.
    """
    check_settings(strength, cfg_scale, sampler, steps, width, height, num_images, karras, eta)
    device = pick_device(device)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype or torch.float32
    if models is None:
        models = cached_models(checkpoint, device, dtype)
    dtype = next(models["diffusion"].parameters()).dtype
    image = load_image(input_image, width, height) if input_image is not None else None
    if seed is None:
        seed = random.randrange(2**32)
        log.info("seed: %d", seed)
    # Noise is drawn on the CPU, so a seed gives the same picture on every device.
    generator = torch.Generator().manual_seed(seed)
    latent_shape = (num_images, 4, height // LATENT_FACTOR, width // LATENT_FACTOR)
    if latents is not None and tuple(latents.shape) != latent_shape:
        raise SDError(f"latents have shape {tuple(latents.shape)} but {num_images} images of {width}x{height} need {latent_shape}")

    with torch.inference_mode():
        guided = cfg_scale != 1.0
        prompts = [negative_prompt] * num_images * guided + [prompt] * num_images
        with on_device(models["clip"], device, idle_device) as clip:
            # (2B or B, 77) -> (2B or B, 77, 768)
            context = clip(encode(prompts).to(device))

        image_latents = None
        if image is not None:
            with on_device(models["encoder"], device, idle_device) as encoder:
                encoder_noise = torch.randn(latent_shape, generator=generator).to(device, dtype)
                # (1, 3, H, W) -> (B, 4, H / 8, W / 8)
                image_latents = encoder(image.to(device, dtype).expand(num_images, -1, -1, -1), encoder_noise).float()
        # drawn after the encoder's noise, in the order of diffusers' img2img pipeline, so a seed gives its image
        noise = (latents if latents is not None else torch.randn(latent_shape, generator=generator)).float().to(device)

        with on_device(models["diffusion"], device, idle_device) as unet:

            def predict_noise(x: torch.Tensor, timestep: float) -> torch.Tensor:
                # (B, 4, h, w) -> (2B, 4, h, w): the unconditional and the conditional halves in one call
                predicted = unet(torch.cat([x] * (1 + guided)).to(dtype), context, timestep).float()
                if not guided:
                    return predicted
                uncond, cond = predicted.chunk(2)
                return uncond + cfg_scale * (cond - uncond)

            x = sample(sampler, predict_noise, noise, steps, generator, image_latents, strength, progress, karras=karras, eta=eta)

        with on_device(models["decoder"], device, idle_device) as decoder:
            # (B, 4, h, w) -> (B, 3, H, W)
            pixels = decoder(x.to(dtype)).float()

    settings = dict(
        prompt=prompt, negative_prompt=negative_prompt, steps=steps, sampler=sampler, karras=karras, eta=eta,
        cfg_scale=cfg_scale, seed=seed, width=width, height=height, strength=strength if image is not None else None,
    )
    return [to_pil(p, settings) for p in pixels]


def check_settings(strength, cfg_scale, sampler, steps, width, height, num_images, karras=False, eta=0.0) -> None:
    """Refuses settings that cannot work, before any model runs."""
    if not 0 < strength <= 1:
        raise SDError(f"strength must be in (0, 1], got {strength}: 1 redraws the image completely, small values keep it")
    if cfg_scale < 0:
        raise SDError(f"cfg scale must be 0 or more, got {cfg_scale}: 7.5 is usual, 1 turns guidance off")
    if sampler not in SAMPLERS:
        raise SDError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    check_options(sampler, karras, eta)
    check_steps(steps, SD15.num_training_steps)
    for name, size in (("width", width), ("height", height)):
        if size < 64 or size % LATENT_FACTOR:
            fit = max(64, size - size % LATENT_FACTOR)
            raise SDError(f"{name} must be a multiple of 8 and at least 64, got {size}: try {fit}")
    if num_images < 1:
        raise SDError(f"the number of images must be at least 1, got {num_images}")


def pick_device(device: str | torch.device | None) -> torch.device:
    """The requested device if it is available; None or "auto" picks CUDA, then MPS, then the CPU."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise SDError(f"unknown device {device!r}: use cpu, cuda or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise SDError(f"device {device.type} is not available on this machine: use --device auto or cpu")
    return device


def default_checkpoint() -> Path:
    """$SD_CHECKPOINT, else data/v1-5-pruned-emaonly.safetensors or .ckpt."""
    if os.environ.get("SD_CHECKPOINT"):
        return Path(os.environ["SD_CHECKPOINT"])
    return next((path for path in DEFAULT_CHECKPOINTS if path.is_file()), DEFAULT_CHECKPOINTS[0])


def cached_models(checkpoint: str | Path | None, device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    if not path.is_file():
        raise SDError(f"checkpoint not found: {path}; download SD 1.5 (v1-5-pruned-emaonly.safetensors) and put it in data/, or pass --checkpoint PATH or set SD_CHECKPOINT")
    key = (path.resolve(), device, dtype)
    if key not in _loaded:
        _loaded.clear()  # one checkpoint in memory at a time
        _loaded[key] = load_models(path, device=device, dtype=dtype)
    return _loaded[key]


class on_device:
    """Moves a model to `device` for a stage, and to `idle_device` (if given) once the stage is done."""

    def __init__(self, model: torch.nn.Module, device: torch.device, idle_device):
        self.model, self.device, self.idle_device = model, device, idle_device

    def __enter__(self) -> torch.nn.Module:
        return self.model.to(self.device)

    def __exit__(self, *exc) -> None:
        if self.idle_device is not None:
            self.model.to(self.idle_device)


def load_image(image: Image.Image | str | Path, width: int, height: int) -> torch.Tensor:
    """An image (or its path), resized to width x height, as (1, 3, H, W) in [-1, 1]."""
    if not isinstance(image, Image.Image):
        try:
            image = Image.open(image)
            image.load()
        except (OSError, UnidentifiedImageError) as error:
            raise SDError(f"cannot read input image {image}: {error.__class__.__name__}; give a PNG, JPEG or WebP file") from None
    image = image.convert("RGB").resize((width, height), Image.LANCZOS)
    # (H, W, 3) uint8 -> (1, 3, H, W) in [-1, 1]
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1)[None]


def to_pil(pixels: torch.Tensor, settings: dict) -> Image.Image:
    # (3, H, W) in [-1, 1] -> (H, W, 3) uint8
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    image = Image.fromarray(array)
    image.info["sd"] = settings
    return image
