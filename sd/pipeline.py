"""`generate()`: text (and optionally an image) in, images out."""

import itertools
import logging
import os
import random
from collections.abc import Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .control import RenderControl, cached_controlnets, check_control, check_controlnets_fit, recorded_unit
from .models.controlnet import Control, ControlNet
from .prompts.embeddings import Embedding
from .errors import SDError
from .hires import UPSCALERS, LatentUpscaler, PixelUpscaler, Target, hires_schedule, hires_target, upscale_latents, upscale_pixels
from .inpaint import INPAINTING_CHANNELS, check_mask_has_image, conditioning_mask, masked_image, paste_back, read_mask, repaint_cells
from .files.lora import LoraFile, LoraLibrary, LoraTag, prompt_loras, warn_of_other_networks
from .files.lora_merge import merged, plan_changes
from .memory import Render, kept_loaded, on_device, out_of_memory_as_error, plan_vae_tiling
from .files import DATA_DIR, DEMO_CHECKPOINT
from .files.loader import LATENT_FACTOR, image_size, load_models
from .files.metadata import too_large
from .precision import compute_dtype, vae_dtype, weights_dtype
from .prompts.editing import Timeline
from .prompts.conditioning import ContextSchedule, guidance_contexts
from .sampling.samplers import KnownRegion, sample, total_steps
from .settings import DEFAULT_MASK_BLUR, RANDOM_SEEDS, Settings

log = logging.getLogger("sd")

DEFAULT_CHECKPOINTS = [DATA_DIR / f"v1-5-pruned-emaonly{suffix}" for suffix in (".safetensors", ".ckpt")]
# Trained by sd/training on drawn shapes; used when no SD 1.5 checkpoint is given or found.
DEMO_NAME = "demo"  # what --checkpoint takes for it
CHECKPOINT_HELP = (
    "get SD 1.5 (v1-5-pruned-emaonly.safetensors from the Stable Diffusion 1.5 release) "
    "and put it in data/, or pass --checkpoint PATH, or set SD_CHECKPOINT"
)
DEMO_NOTICE = (
    "using the built-in demo model (64x64 images of one coloured shape: red, green, blue, yellow, purple or orange "
    f"circle, square or triangle, on the left, right, top or bottom); for real images {CHECKPOINT_HELP}"
)

# The models of the last checkpoint loaded, reused by later calls: (path, device, dtype, VAE file) -> models.
_loaded: dict[tuple, dict[str, torch.nn.Module]] = {}


@dataclass(frozen=True)
class Stages:
    """A render's models and how each stage runs one: on `device`, moved to `idle_device` after the stage where given;
    the text encoder, U-Net and ControlNets computing in `dtype`, the VAE in `vae_dtype`, in tiles where `tiled`."""

    models: dict[str, torch.nn.Module]
    device: torch.device
    idle_device: torch.device | str | None
    dtype: torch.dtype
    vae_dtype: torch.dtype
    tiled: bool

    def on_device(self, name: str):
        return on_device(self.models[name], self.device, self.idle_device)


def generate(
    prompt: str | Settings,
    *,
    input_image: Image.Image | str | Path | None = None,
    mask: Image.Image | str | Path | None = None,
    num_images: int = 1,
    models: dict[str, torch.nn.Module] | None = None,
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    idle_device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    latents: torch.Tensor | None = None,
    progress: bool = True,
    vae_tiling: bool | None = None,
    embeddings: Mapping[str, Embedding] | None = None,
    vae: str | Path | None = None,
    control_images: Sequence[Image.Image | str | Path] = (),
    controlnet_models: Sequence[ControlNet] | None = None,
    loras: LoraLibrary | None = None,
    **settings,
) -> list[Image.Image]:
    """Renders `num_images` images with the given Settings, or of a prompt with Settings' fields given by name
    (`generate("a cat", steps=20, seed=1)`; with a Settings, such fields override its own). With `input_image`,
    redraws that image (image-to-image); with a `mask` too, only the mask's white part (inpainting, see
    sd/inpaint.py). `strength` defaults to 0.8, or to 1.0 when an inpainting checkpoint repaints a mask. With an
    ordinary checkpoint the original pixels are pasted back outside the mask, over an edge feathered by a
    Gaussian blur of radius `mask_blur` pixels. With a `hires_scale` (or `hires_width`/`hires_height`), hires fix:
    width x height is the first pass, redrawn at the hires size by hires_pass().

    `width` and `height` default to the size the model was trained at (512 for SD 1.5, 64 for the demo model). With
    neither `models` nor `checkpoint`, the checkpoint is default_checkpoint(). Each image's `info["sd"]` holds the
    Settings that made it, with the seed, the size and the strength it got.

    `vae_tiling` decodes (and encodes) in tiles of 512x512 pixels, whose memory does not grow with the image
    (sd/models/tiling.py); None: only where a whole image would not fit in memory (sd/memory.py), which a render
    that cannot fit even so is refused with an SDError before the models load.

    `embeddings` (sd/prompts/embeddings.py, load_embeddings): textual-inversion embeddings, by the trigger words that
    stand for them in the prompts; those used are recorded in the Settings' `ti_hashes`.

    `vae`: a VAE file to stand in for the checkpoint's (sd/files/vae_file.py), for the models generate() loads; given
    `models`, swap their VAE with swap_vae (sd/files/loader.py) instead.
    `control_images`: one for each of the Settings' `controlnets` (sd/control.py), in their order; each is resized
    to the output size and preprocessed as its unit says. The ControlNets are loaded from their units' files, or
    given loaded in `controlnet_models` (sd/files/loader.py, load_controlnet), in the same order.
    `loras` (sd/files/lora.py): the LoRA files that the prompt's `<lora:NAME:MULTIPLIER>` tags name, by name; None: those
    of data/lora/. Their changes are merged into the weights for this render only (sd/files/lora_merge.py); those used
    are recorded in the Settings' `lora_hashes`.
    """
    settings = replace(prompt, **settings) if isinstance(prompt, Settings) else Settings(prompt, **settings)
    if num_images < 1:
        raise SDError(f"the number of images must be at least 1, got {num_images}")
    check_mask_has_image(mask, input_image)
    if settings.hires and input_image is not None:
        raise SDError("hires fix is text-to-image only, as in A1111: leave out the input image, or the hires settings")
    if models is not None and vae is not None:
        raise SDError("a VAE file is loaded with the models: give it to load_models (or swap_vae), not with models to generate")
    device = pick_device(device)
    dtype = weights_dtype(dtype, device)
    inputs = read_inputs(settings, input_image, mask, control_images, controlnet_models, loras, models, checkpoint)
    # the weights' dtype: the loaded models', or the one they will be loaded in
    stored = next(models["diffusion"].parameters()).dtype if models is not None else dtype
    render = Render(*inputs.largest_size, num_images, settings.cfg_scale != 1.0, compute_dtype(stored, device), len(settings.controlnets))
    tiled = plan_vae_tiling(render, device, None if models is not None else stored, vae_tiling)
    if models is None:
        models = cached_models(find_checkpoint(checkpoint), device, stored, vae)
    stages = Stages(models, device, idle_device, compute_dtype(stored, device), vae_dtype(stored, device), tiled)
    lora_changes = plan_changes(models, inputs.lora_files)  # every module checked before anything runs
    if settings.controlnets and controlnet_models is None:
        controlnet_models = cached_controlnets([unit.model for unit in settings.controlnets], device, stored)
    check_controlnets_fit(controlnet_models or (), models["diffusion"])
    control = RenderControl(settings.controlnets, controlnet_models or (), inputs.control_sources, stages)
    start = starting_point(settings, inputs, num_images, is_inpainting_model(models["diffusion"]), latents)
    # Noise is drawn on the CPU, so a seed gives the same picture on every device.
    generator = torch.Generator().manual_seed(start.seed)

    with torch.inference_mode(), out_of_memory_as_error(*inputs.largest_size):
        guided = settings.cfg_scale != 1.0
        with stages.on_device("clip"), merged(lora_changes["clip"]):
            # per step, (2B or B, 77k, 768): the prompts in chunks of 77 tokens, the shorter padded (sd/prompts/conditioning.py)
            contexts, used = guidance_contexts(models, settings, num_images, guided, pass_timelines(settings), stages.dtype, embeddings)

        with stages.on_device("encoder") if start.needs_encoder else nullcontext() as encoder:
            image_latents = encode_image(stages, encoder, start.image, generator, start.latent_shape) if start.needs_image_latents else None
            # drawn after the encoder's noise, in the order of diffusers' img2img pipeline, so a seed gives its image
            noise = (latents if latents is not None else torch.randn(start.latent_shape, generator=generator)).float().to(device)
            # and the masked image's encoder noise last, as in diffusers' inpainting pipeline
            conditioning = (inpainting_conditioning(stages, encoder, start.image, start.repaint, generator, start.latent_shape)
                            if start.inpainting_model else None)
        known = KnownRegion(image_latents, repaint_cells(start.repaint, start.latent_shape[2:]).to(device)) if start.keeps_unmasked else None

        calls = total_steps(settings.sampler, settings.steps)
        with unet_with_loras(stages, lora_changes["diffusion"]):
            with stages.on_device("diffusion") as unet, control.guiding(inputs.width, inputs.height, calls) as guides:
                predict_noise = noise_predictor(unet, contexts[0], conditioning, settings.cfg_scale, stages.dtype, guides)
                start_latents = None if start.pure_noise else image_latents
                x = sample(settings.sampler, predict_noise, noise, settings.steps, generator, start_latents, start.strength, progress,
                           karras=settings.karras, eta=settings.eta, known=known)
            if inputs.hires is not None:
                x = hires_pass(stages, x, settings, inputs.hires, start.seed, contexts[1], progress, control)

        with stages.on_device("decoder") as decoder:
            # (B, 4, h, w) -> (B, 3, H, W)
            pixels = decoder(x.to(stages.vae_dtype), tiled=tiled).float()

    return finished_images(pixels, settings, inputs, start, used)


@dataclass(frozen=True)
class Inputs:
    """What a render is given besides its settings, read and checked before any model loads (so that a mistake costs
    no waiting): the output size, the input image, the mask, the control images and the prompt's LoRA files."""

    width: int
    height: int
    hires: Target | None  # hires fix's size, where asked
    source: Image.Image | None  # image-to-image's input, as read
    repaint: torch.Tensor | None  # inpainting's mask at width x height (1, 1, H, W): 1 where to repaint
    control_sources: list[Image.Image]  # one per ControlNet of the settings
    lora_files: list[tuple[LoraTag, LoraFile]]  # the prompt's <lora:...> tags and the files they name

    @property
    def largest_size(self) -> tuple[int, int]:
        """The largest width and height the render reaches: hires fix's where asked."""
        return (self.hires.width, self.hires.height) if self.hires is not None else (self.width, self.height)


def read_inputs(settings: Settings, input_image, mask, control_images: Sequence, controlnet_models: Sequence[ControlNet] | None,
                loras: LoraLibrary | None, models: dict | None, checkpoint: str | Path | None) -> Inputs:
    """generate()'s images read and checked, and its size found (from the checkpoint's header where not given)."""
    source = read_image(input_image, "input image") if input_image is not None else None
    check_control(settings.controlnets, len(control_images), controlnet_models)
    control_sources = [read_image(image, "control image") for image in control_images]
    lora_files = prompt_loras(settings.prompt, loras if loras is not None else LoraLibrary())
    warn_of_other_networks(settings.prompt)
    if models is None and (settings.width is None or settings.height is None):
        checkpoint = find_checkpoint(checkpoint)  # its header gives the size
    width, height = image_dimensions(settings.width, settings.height, models, checkpoint)
    hires = hires_target(width, height, settings.hires_scale, settings.hires_width, settings.hires_height) if settings.hires else None
    repaint = read_mask(read_image(mask, "mask"), source.size, width, height) if mask is not None else None
    if repaint is not None and repaint.all():
        log.warning("the mask is all white, so the whole image is repainted: this is plain image-to-image")
    return Inputs(width, height, hires, source, repaint, control_sources, lora_files)


@dataclass(frozen=True)
class Start:
    """Where the first sampling pass starts: from `seed`, at `strength`, from the input image fitted to the output size
    (`original`, and as `image` (1, 3, H, W) in [-1, 1]), repainting where `repaint` is 1, with an inpainting checkpoint
    or not; latents of `latent_shape` (B, 4, h, w)."""

    seed: int
    strength: float
    original: Image.Image | None
    image: torch.Tensor | None
    repaint: torch.Tensor | None
    inpainting_model: bool
    latent_shape: tuple[int, int, int, int]

    @property
    def pure_noise(self) -> bool:
        """Inpainting at full strength starts from pure noise, as diffusers' inpainting pipeline does (image-to-image
        keeps a trace of the image): an inpainting checkpoint then needs no latents of the whole image."""
        return self.repaint is not None and self.strength == 1.0

    @property
    def keeps_unmasked(self) -> bool:
        """Whether sampling itself keeps the image outside the mask: an ordinary checkpoint's inpainting."""
        return self.repaint is not None and not self.inpainting_model

    @property
    def needs_image_latents(self) -> bool:
        """The start of image-to-image, or what an ordinary checkpoint must keep outside the mask."""
        return self.image is not None and (self.keeps_unmasked or not self.pure_noise)

    @property
    def needs_encoder(self) -> bool:
        """For the image's latents, or an inpainting checkpoint's conditioning (the masked image's latents)."""
        return self.needs_image_latents or self.inpainting_model


def starting_point(settings: Settings, inputs: Inputs, num_images: int, inpainting_model: bool, latents: torch.Tensor | None) -> Start:
    """The Start of `settings` with `inputs`: its seed drawn where not given, its strength by default 0.8, or 1.0 where an
    inpainting checkpoint repaints a mask. Refuses `latents` of another shape than the render's."""
    strength = settings.strength
    if strength is None:
        strength = 1.0 if inpainting_model and inputs.repaint is not None else 0.8
    original = fit_image(inputs.source, inputs.width, inputs.height) if inputs.source is not None else None
    seed = settings.seed
    if seed is None:
        seed = random.randrange(RANDOM_SEEDS)
        log.info("seed: %d", seed)
    latent_shape = (num_images, 4, inputs.height // LATENT_FACTOR, inputs.width // LATENT_FACTOR)
    if latents is not None and tuple(latents.shape) != latent_shape:
        raise SDError(f"latents have shape {tuple(latents.shape)} but {num_images} images of {inputs.width}x{inputs.height} need {latent_shape}")
    image = to_tensor(original) if original is not None else None
    return Start(seed, strength, original, image, inputs.repaint, inpainting_model, latent_shape)


def finished_images(pixels: torch.Tensor, settings: Settings, inputs: Inputs, start: Start, embeddings_used: Mapping[str, Embedding]) -> list[Image.Image]:
    """The decoded pixels (B, 3, H, W) as images, the original pasted back outside an ordinary checkpoint's mask, each
    with the Settings that made it in its info["sd"]."""
    images = [to_pil(p) for p in pixels]
    mask_blur = DEFAULT_MASK_BLUR if settings.mask_blur is None else settings.mask_blur
    if start.keeps_unmasked:
        images = [paste_back(generated, start.original, start.repaint, mask_blur) for generated in images]
    made = replace(settings, seed=start.seed, width=inputs.width, height=inputs.height, strength=start.strength if start.image is not None else None,
                   inpainted=start.repaint is not None, mask_blur=mask_blur if start.keeps_unmasked else None,
                   ti_hashes={name: embedding.short_hash for name, embedding in embeddings_used.items()},
                   controlnets=tuple(recorded_unit(unit) for unit in settings.controlnets),
                   lora_hashes={tag.name: lora.short_hash for tag, lora in inputs.lora_files})
    for output in images:
        output.info["sd"] = made
    return images


def pass_timelines(settings: Settings) -> list[Timeline]:
    """How each sampling pass counts steps for prompt editing: the first pass's (image-to-image counts all of
    `steps`, though it runs fewer, as A1111 counts them), and hires fix's second pass's, counted on from it."""
    first = Timeline(total_steps(settings.sampler, settings.steps))
    if not settings.hires:
        return [first]
    hires_steps = total_steps(settings.hires_sampler or settings.sampler, settings.hires_steps or settings.steps)
    return [first, Timeline(hires_steps, step_offset=first.steps, fraction_offset=1.0)]


def noise_predictor(unet: torch.nn.Module, contexts: ContextSchedule, conditioning: torch.Tensor | None, cfg_scale: float, dtype: torch.dtype,
                    control: Control | None = None):
    """The U-Net's noise prediction for latents at a timestep, with classifier-free guidance unless cfg_scale is
    1 (then the contexts hold the prompts alone), and an inpainting checkpoint's `conditioning` beside the
    latents. Each call takes the context of its count from 0, as prompt editing schedules it. With `control`, the
    ControlNets' residuals for the same latents (without the conditioning) are added to the U-Net's."""
    guided = cfg_scale != 1.0
    calls = itertools.count()

    def predict_noise(x: torch.Tensor, timestep: float) -> torch.Tensor:
        call = next(calls)
        context = contexts(call)
        # (B, 4, h, w) -> (2B, 4, h, w): the unconditional and the conditional halves in one call
        latents = torch.cat([x] * (1 + guided)).to(dtype)
        residuals = control(latents, context, timestep, call, guided) if control is not None else None
        if conditioning is not None:
            # (2B, 4, h, w) -> (2B, 9, h, w)
            latents = torch.cat([latents, torch.cat([conditioning] * (1 + guided)).to(dtype)], dim=1)
        predicted = unet(latents, context, timestep, residuals).float()
        if not guided:
            return predicted
        uncond, cond = predicted.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    return predict_noise


def hires_pass(stages: Stages, latents: torch.Tensor, settings: Settings, target: Target, seed: int, contexts: ContextSchedule, progress: bool,
               control: RenderControl | None = None) -> torch.Tensor:
    """A1111's second pass of hires fix: the first pass's latents (B, 4, h, w) upscaled to `target`, noised
    afresh from the same seed at the new size, and redrawn by image-to-image with the prompt encodings of
    `contexts`, as the last hires_steps (or steps) of a schedule of
    int(those steps / hires_strength).
    `control`: the render's ControlNets, which guide this pass too, their control images resized to its size.
    Returns the latents (B, 4, H/8, W/8)."""
    generator = torch.Generator().manual_seed(seed)
    latent_shape = (len(latents), 4, *target.latent_size)
    # drawn first, as A1111 draws it; encoder noise comes after
    noise = torch.randn(latent_shape, generator=generator).to(stages.device)
    upscaler = UPSCALERS[settings.hires_upscaler]
    if isinstance(upscaler, LatentUpscaler):
        upscaled = upscale_latents(latents, upscaler, target)  # (B, 4, h, w) -> (B, 4, H/8, W/8)
    else:
        upscaled = upscale_decoded(stages, latents, upscaler, target, generator)  # the same
    conditioning = None
    if is_inpainting_model(stages.models["diffusion"]):  # repaints everything, as in text-to-image
        with stages.on_device("encoder") as encoder:
            conditioning = inpainting_conditioning(stages, encoder, None, None, generator, latent_shape)
    steps = settings.hires_steps or settings.steps
    sampler, karras = (settings.hires_sampler, settings.hires_karras) if settings.hires_sampler else (settings.sampler, settings.karras)
    eta = settings.eta if sampler == "ddim" else 0.0
    guiding = control.guiding(target.width, target.height, total_steps(sampler, steps)) if control is not None else nullcontext()
    with stages.on_device("diffusion") as unet, guiding as guides:
        predict_noise = noise_predictor(unet, contexts, conditioning, settings.cfg_scale, stages.dtype, guides)
        return sample(sampler, predict_noise, noise, steps, generator, upscaled, settings.hires_strength, progress,
                      karras=karras, eta=eta, schedule_steps=hires_schedule(steps, settings.hires_strength))


def upscale_decoded(stages: Stages, latents: torch.Tensor, upscaler: PixelUpscaler, target: Target, generator: torch.Generator) -> torch.Tensor:
    """A pixel upscaler's hires latents: decoded to 8-bit images, resized by PIL, encoded again."""
    with stages.on_device("decoder") as decoder:
        pixels = decoder(latents.to(stages.vae_dtype), tiled=stages.tiled).float()  # (B, 4, h, w) -> (B, 3, 8h, 8w)
    # B x (1, 3, H, W) -> (B, 3, H, W)
    images = torch.cat([to_tensor(upscale_pixels(to_pil(image), upscaler, target)) for image in pixels])
    latent_shape = (len(latents), 4, *target.latent_size)
    with stages.on_device("encoder") as encoder:
        return encode_image(stages, encoder, images, generator, latent_shape)


def is_inpainting_model(unet: torch.nn.Module) -> bool:
    """Whether the U-Net takes an inpainting checkpoint's 9 input channels; SD 1.5's takes 4."""
    channels = unet.config.in_channels
    if channels not in (4, INPAINTING_CHANNELS):
        raise SDError(f"the checkpoint's U-Net takes {channels} input channels: use an SD 1.5 checkpoint (4) or an SD 1.5 inpainting checkpoint (9)")
    return channels == INPAINTING_CHANNELS


def encode_image(stages: Stages, encoder: torch.nn.Module, image: torch.Tensor, generator: torch.Generator, latent_shape: tuple) -> torch.Tensor:
    """Latents of `image` (1 or B, 3, H, W), one draw from the encoder's posterior per image of the batch."""
    noise = torch.randn(latent_shape, generator=generator).to(stages.device, stages.vae_dtype)
    # (1 or B, 3, H, W) -> (B, 4, h, w): one image's posterior mean and spread serve the whole batch, the noise differs
    return encoder(image.to(stages.device, stages.vae_dtype), noise, tiled=stages.tiled).float()


def inpainting_conditioning(stages: Stages, encoder: torch.nn.Module, image: torch.Tensor | None, repaint: torch.Tensor | None, generator: torch.Generator,
                            latent_shape: tuple) -> torch.Tensor:
    """What an inpainting U-Net takes beside the latents, (B, 5, h, w): the mask and the latents of the masked
    image. Without a mask it repaints everything: mask all 1, the image all gray."""
    batch, _, height, width = latent_shape
    size = (height * LATENT_FACTOR, width * LATENT_FACTOR)
    repaint = repaint if repaint is not None else torch.ones(1, 1, *size)
    pixels = masked_image(image if image is not None else torch.zeros(1, 3, *size), repaint)
    masked_latents = encode_image(stages, encoder, pixels, generator, latent_shape)  # (B, 4, h, w)
    mask = conditioning_mask(repaint, (height, width)).to(stages.device).expand(batch, -1, -1, -1)  # (B, 1, h, w)
    return torch.cat([mask, masked_latents], dim=1)  # (B, 1 + 4, h, w)


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
    """$SD_CHECKPOINT, else data/v1-5-pruned-emaonly.safetensors or .ckpt, else the demo model."""
    if os.environ.get("SD_CHECKPOINT"):
        return Path(os.environ["SD_CHECKPOINT"])
    return next((path for path in DEFAULT_CHECKPOINTS if path.is_file()), DEMO_CHECKPOINT)


def find_checkpoint(checkpoint: str | Path | None) -> Path:
    """The checkpoint file to load: the one given ("demo" for the demo model), else default_checkpoint(); says
    so in one line when that is the demo model. Refuses a file that is not there."""
    if str(checkpoint) == DEMO_NAME:
        checkpoint = DEMO_CHECKPOINT
    path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    if path == DEMO_CHECKPOINT and checkpoint is None:
        notice_demo()
    if not path.is_file():
        raise SDError(f"checkpoint not found: {path}; {CHECKPOINT_HELP}")
    return path


@lru_cache(maxsize=1)
def notice_demo() -> None:
    """Says once per process that the demo model stands in for a checkpoint nobody gave."""
    log.warning(DEMO_NOTICE)


def image_dimensions(width: int | None, height: int | None, models: dict | None, checkpoint: Path | None) -> tuple[int, int]:
    """The width and height asked for, or where not given, the side of the images the models (or else the
    checkpoint, read from its header alone) were trained on: 512 for SD 1.5, 64 for the demo model."""
    if width is not None and height is not None:
        return width, height
    side = models["diffusion"].config.sample_size * LATENT_FACTOR if models is not None else image_size(checkpoint)
    return width or side, height or side


def cached_models(checkpoint: Path, device: torch.device, dtype: torch.dtype, vae: Path | None = None) -> dict[str, torch.nn.Module]:
    """The models of `checkpoint` (see find_checkpoint), with the VAE file `vae` if given, loaded once for all
    later calls with the same files; one checkpoint in memory at a time."""
    key = (Path(checkpoint).resolve(), device, dtype, Path(vae).resolve() if vae is not None else None)
    return kept_loaded(_loaded, [key], lambda key: load_models(checkpoint, device=device, dtype=dtype, vae=vae))[0]


@contextmanager
def unet_with_loras(stages: Stages, lora_changes: dict):
    """The U-Net with the LoRAs' changes merged for a render's sampling passes (merged once for both of hires fix's),
    where it rests between them: on `idle_device` if given (each pass then moves the merged weights to the device),
    else on the device. Without LoRAs it stays where it is."""
    if lora_changes:
        stages.models["diffusion"].to(stages.idle_device if stages.idle_device is not None else stages.device)
    with merged(lora_changes):
        yield


def read_image(image: Image.Image | str | Path, what: str) -> Image.Image:
    """An image, or the image at a path, read whole (so that a file that is no image fails before the models load)."""
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as opened:
            opened.load()
            return opened.copy()
    except Image.DecompressionBombError as error:
        raise SDError(f"{what} {image} is too large to read: {too_large(error)}: give a smaller image") from None
    except OSError:  # UnidentifiedImageError is an OSError
        raise SDError(f"{what} {image} is not an image this program can read: give a PNG, JPEG or WebP file") from None


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """The image in RGB, resized to width x height."""
    return image.convert("RGB").resize((width, height), Image.LANCZOS)


def to_tensor(image: Image.Image) -> torch.Tensor:
    # (H, W, 3) uint8 -> (1, 3, H, W) in [-1, 1]
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1)[None]


def to_pil(pixels: torch.Tensor) -> Image.Image:
    # (3, H, W) in [-1, 1] -> (H, W, 3) uint8
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
