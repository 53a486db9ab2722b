"""Inpainting: repaint the white part of a mask, keep the image where the mask is black.

Two ways, chosen by the checkpoint. An ordinary SD 1.5 U-Net never learnt to inpaint: the sampler holds the
latents outside the mask to the input image's (samplers.KnownRegion) and the original pixels are pasted back
at the end, with a feathered edge. An inpainting checkpoint's U-Net takes 5 more input channels, the mask and
the latents of the masked image, and repaints knowing both.
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from .errors import SDError

INPAINTING_CHANNELS = 9  # the U-Net's input: latents (4), the mask (1), the masked image's latents (4)
# masks drawn or saved at another size keep the image's aspect ratio to within a pixel or two
ASPECT_TOLERANCE = 0.01


def check_mask_has_image(mask, image) -> None:
    if mask is not None and image is None:
        raise SDError("a mask needs the image it masks: give the input image too (--input)")


def read_mask(mask: Image.Image, image_size: tuple[int, int], width: int, height: int) -> torch.Tensor:
    """The mask at width x height as (1, 1, H, W): 1 where to repaint (white), 0 where to keep (black).

    As diffusers' mask processor: resized in its own mode, made grayscale, then cut at mid-gray, so any mode
    works and a soft edge becomes a hard one."""
    mask_ratio, image_ratio = mask.width / mask.height, image_size[0] / image_size[1]
    if abs(mask_ratio / image_ratio - 1) > ASPECT_TOLERANCE:
        raise SDError(
            f"the mask is {mask.width}x{mask.height} but the input image is {image_size[0]}x{image_size[1]}: "
            f"their aspect ratios differ ({mask_ratio:.3f} and {image_ratio:.3f}); give a mask of the image's shape"
        )
    gray = mask.resize((width, height), Image.LANCZOS).convert("L")
    # (H, W) uint8 -> (1, 1, H, W) of 0 and 1; 128 / 255 is the first value above one half
    repaint = torch.from_numpy(np.asarray(gray) >= 128).float()[None, None]
    if not repaint.any():
        raise SDError("the mask is all black, so there is nothing to repaint: paint the part to repaint white")
    return repaint


def masked_image(image: torch.Tensor, repaint: torch.Tensor) -> torch.Tensor:
    """The kept part of the image (1, 3, H, W), mid-gray (0) where the model is to repaint: what an inpainting
    U-Net was trained to see."""
    return image * (repaint < 0.5)


def conditioning_mask(repaint: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """The mask an inpainting U-Net sees, (1, 1, H, W) -> (1, 1, h, w): the top-left pixel of each latent cell
    (nearest-neighbour), as it was trained."""
    return F.interpolate(repaint, size=latent_size, mode="nearest")


def repaint_cells(repaint: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """The latent cells an ordinary checkpoint regenerates, (1, 1, H, W) -> (1, 1, h, w) bool: each with any pixel
    to repaint, so that the whole white area is generated; the pasted-back pixels restore the rest."""
    return F.adaptive_max_pool2d(repaint, latent_size) > 0


def paste_back(generated: Image.Image, original: Image.Image, repaint: torch.Tensor, blur: int) -> Image.Image:
    """`generated` inside the mask, the `original` pixels outside, blended over a Gaussian edge of `blur` pixels
    (radius); outside that edge every pixel is the original's."""
    # (1, 1, H, W) of 0 and 1 -> (H, W) uint8 of 0 and 255
    hard = Image.fromarray((repaint[0, 0] * 255).to(torch.uint8).numpy())
    return Image.composite(generated, original, hard.filter(ImageFilter.GaussianBlur(blur)))
