"""Hires fix as AUTOMATIC1111 (A1111) does it: render small, upscale, redraw the upscaled image with image-to-image.

SD 1.5 was trained at 512x512 and repeats subjects at larger sizes, so a large image is first rendered at a
size the model knows, then upscaled, then given fresh noise and denoised again at the large size. This module
holds the parts that know nothing of the models: the upscalers, the target size and the upscaling itself;
sd/pipeline.py runs the second pass.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from .errors import SDError
from .files.loader import LATENT_FACTOR

MIN_SIZE = 64
# A1111 never denoises from pure noise in the second pass: its strength is capped below 1
MAX_SCHEDULE_SHARE = 0.999


@dataclass(frozen=True)
class LatentUpscaler:
    """Resizes the latents themselves: cheap, and the second pass redraws the blur it leaves."""

    a1111_name: str
    mode: str  # of F.interpolate
    antialias: bool = False


@dataclass(frozen=True)
class PixelUpscaler:
    """Decodes, resizes the pixels with PIL, encodes again."""

    a1111_name: str
    resample: Image.Resampling


UPSCALERS = {
    "latent": LatentUpscaler("Latent", "bilinear"),
    "latent-antialiased": LatentUpscaler("Latent (antialiased)", "bilinear", antialias=True),
    "latent-bicubic": LatentUpscaler("Latent (bicubic)", "bicubic"),
    "latent-bicubic-antialiased": LatentUpscaler("Latent (bicubic antialiased)", "bicubic", antialias=True),
    "latent-nearest": LatentUpscaler("Latent (nearest)", "nearest"),
    "latent-nearest-exact": LatentUpscaler("Latent (nearest-exact)", "nearest-exact"),
    "lanczos": PixelUpscaler("Lanczos", Image.Resampling.LANCZOS),
    "nearest": PixelUpscaler("Nearest", Image.Resampling.NEAREST),
}
DEFAULT_UPSCALER = "latent"  # A1111's when none is named


@dataclass(frozen=True)
class Target:
    """Where the upscale goes: `upscaled` (width, height) covers the hires size, and the latents are then cut
    to it, `crop` (left, top) latent cells in; without a crop the two sizes are the same."""

    width: int
    height: int
    upscaled: tuple[int, int]
    crop: tuple[int, int] = (0, 0)

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // LATENT_FACTOR, self.width // LATENT_FACTOR


def hires_target(width: int, height: int, scale: float | None, resize_width: int | None, resize_height: int | None) -> Target:
    """A1111's target of the first pass width x height: int(side * scale) each; or the resize box with one side
    given, the other keeping the aspect ratio; or, with both, an upscale that covers the box, cut at its center.
    A size that is not a multiple of 8 is an SDError naming the nearest one that works."""
    if scale is not None:
        if not math.isfinite(scale * max(width, height)):
            raise SDError(f"hires scale {scale:g} makes {width}x{height} larger than any number: 2 doubles the width and the height")
        target = int(width * scale), int(height * scale)
        if not all(valid(side) for side in target):
            fits = nearest_scale(width, height, scale)
            hint = f"try hires scale {fits:g}" if fits else "give hires width and height instead"
            raise SDError(f"hires scale {scale:g} makes {width}x{height} into {target[0]}x{target[1]}, and sizes must be "
                          f"multiples of 8 of at least {MIN_SIZE}: {hint}")
        return Target(*target, upscaled=target)
    if resize_width and resize_height:
        for name, side in (("width", resize_width), ("height", resize_height)):
            check_side(f"hires {name}", side)
        # scaled by the box's side whose ratio to the first pass is larger, the other side overhangs
        if width * resize_height < height * resize_width:
            upscaled = resize_width, resize_width * height // width
        else:
            upscaled = resize_height * width // height, resize_height
        crop = [(cover - side) // LATENT_FACTOR // 2 for cover, side in zip(upscaled, (resize_width, resize_height))]
        return Target(resize_width, resize_height, upscaled, tuple(crop))
    given, name, first, other = (resize_width, "width", width, height) if resize_width else (resize_height, "height", height, width)
    check_side(f"hires {name}", given)
    kept = given * other // first
    if not valid(kept):
        fits = min((side for side in range(MIN_SIZE, 2 * given + LATENT_FACTOR, LATENT_FACTOR) if valid(side * other // first)),
                   key=lambda side: abs(side - given), default=None)
        hint = f"try hires {name} {fits}" if fits else "give both hires width and hires height"
        raise SDError(f"hires {name} {given} keeps the aspect ratio of {width}x{height} with a side of {kept}, not a multiple of "
                      f"8 of at least {MIN_SIZE}: {hint}")
    target = (given, kept) if name == "width" else (kept, given)
    return Target(*target, upscaled=target)


def valid(side: int) -> bool:
    return side >= MIN_SIZE and side % LATENT_FACTOR == 0


def check_side(name: str, side: int) -> None:
    if not valid(side):
        raise SDError(f"{name} must be a multiple of 8 and at least {MIN_SIZE}, got {side}: try {max(MIN_SIZE, side - side % LATENT_FACTOR)}")


def nearest_scale(width: int, height: int, scale: float) -> float | None:
    """The scale nearest `scale`, with at most 3 decimals, that makes width x height a valid size, and that enlarges
    it where `scale` does (1 would make hires fix a second pass at the same size); None if none up to twice the size
    asked for does."""
    # rounded up, so that int(width * s) is the side again (rounded, 96 / 72 gave 1.333, which makes 95)
    candidates = (math.ceil(side / width * 1000) / 1000 for side in range(MIN_SIZE, 2 * int(width * scale) + MIN_SIZE, LATENT_FACTOR))
    fitting = [s for s in candidates if valid(int(width * s)) and valid(int(height * s)) and (s > 1 or scale <= 1)]
    return min(fitting, key=lambda s: abs(s - scale), default=None)


def hires_schedule(steps: int, strength: float) -> int:
    """The length of A1111's second-pass schedule, of which the last `steps` run: 20 steps at strength 0.7 run
    the last 20 of 28. (Plain image-to-image runs the last int(steps * strength) of `steps`.)"""
    return int(steps / min(strength, MAX_SCHEDULE_SHARE))


def upscale_latents(latents: torch.Tensor, upscaler: LatentUpscaler, target: Target) -> torch.Tensor:
    size = target.upscaled[1] // LATENT_FACTOR, target.upscaled[0] // LATENT_FACTOR
    # (B, 4, h, w) -> (B, 4, H/8, W/8) of the covering size
    upscaled = F.interpolate(latents, size=size, mode=upscaler.mode, antialias=upscaler.antialias)
    return crop_latents(upscaled, target)


def crop_latents(latents: torch.Tensor, target: Target) -> torch.Tensor:
    (left, top), (height, width) = target.crop, target.latent_size
    # (B, 4, H'/8, W'/8) -> (B, 4, H/8, W/8)
    return latents[:, :, top:top + height, left:left + width]


def upscale_pixels(image: Image.Image, upscaler: PixelUpscaler, target: Target) -> Image.Image:
    """The image resized to cover the target, cut as the latents would be."""
    left, top = (cells * LATENT_FACTOR for cells in target.crop)
    resized = image.resize(target.upscaled, upscaler.resample)
    return resized.crop((left, top, left + target.width, top + target.height))
