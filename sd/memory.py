"""How much memory a render needs, estimated from its size before anything loads, and how much the machine has.

The figures are peaks above the loaded weights, measured once on SD 1.5's models in fp32 on a CPU
(benchmarks/README.md, "Memory of a render"), and scaled by the width of the dtype the models compute in.
They grow with the pixels: the U-Net's with the latents of both guidance halves, the VAE's with the image it
decodes at once (a whole image, or one tile). A render that would not fit is refused before the load; one whose
decode alone would not fit is decoded in tiles.
"""

import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SDError
from .files.loader import LATENT_FACTOR, release_mapped
from .models.layers import release_scratch, trim_heap

log = logging.getLogger("sd")

GIB = 2**30
# Peaks above the weights in fp32, per image pixel: the U-Net's for one image of the batch and guidance half
# (measured 1.20 GiB at 256x256, 1.46 GiB at 768x768 for both halves: 267 bytes a pixel, taken as 400 for
# the heap's fragmentation), the decoder's and the encoder's (2.7-2.9 and 2.2-3.3 KB measured).
UNET_FIXED_BYTES = 1.3 * GIB
UNET_BYTES_PER_PIXEL = 400
DECODER_BYTES_PER_PIXEL = 2900
ENCODER_BYTES_PER_PIXEL = 3400
# the decoded image as fp32 tensor, then as 8-bit PIL image
IMAGE_BYTES_PER_PIXEL = 3 * 4 + 3
# a tile of the tiled VAE (sd/models/tiling.py): 64x64 latents
TILE_PIXELS = (64 * LATENT_FACTOR) ** 2
# the weights a CPU render holds in memory throughout, in parameters: SD 1.5's U-Net and VAE decoder (the text
# encoder and the VAE encoder stay memory-mapped, sd/files/loader.py)
RESIDENT_PARAMETERS = 859_520_964 + 49_490_199
CONTROLNET_PARAMETERS = 361_279_120  # an SD 1.5 ControlNet's, held while the U-Net runs (sd/models/controlnet.py)
# left to everything else: the Python process, the libraries, the memory-mapped models while they run
HEADROOM = 0.5 * GIB


@dataclass(frozen=True)
class Render:
    """What the memory of a render depends on."""

    width: int
    height: int
    batch: int
    guided: bool
    dtype: torch.dtype  # the dtype the models compute in
    controlnets: int = 0  # ControlNets beside the U-Net

    def unet_bytes(self) -> float:
        scale = self.dtype.itemsize / 4
        images = self.batch * (1 + self.guided)
        return (UNET_FIXED_BYTES + UNET_BYTES_PER_PIXEL * self.width * self.height * images) * scale

    def vae_bytes(self, tiled: bool) -> float:
        """Decoding (or encoding: the two are alike) all images of the batch at once, or tile by tile."""
        pixels = self.width * self.height
        at_once = min(pixels, TILE_PIXELS) if tiled else pixels
        per_pixel = max(DECODER_BYTES_PER_PIXEL, ENCODER_BYTES_PER_PIXEL) * self.dtype.itemsize / 4
        return per_pixel * at_once * self.batch + IMAGE_BYTES_PER_PIXEL * pixels * self.batch


def plan_vae_tiling(render: Render, device: torch.device, weights: torch.dtype | None, vae_tiling: bool | None) -> bool:
    """Whether the VAE works in tiles: as asked, or where not asked, when a whole image would not fit. Refuses a
    render that cannot fit even so, naming the largest size that would. `weights`: the dtype the weights will be
    loaded in, or None when they are loaded already (then the memory they take is no longer free)."""
    free = free_bytes(device)
    if free is None:  # nothing to go by: as asked
        return bool(vae_tiling)
    parameters = RESIDENT_PARAMETERS + render.controlnets * CONTROLNET_PARAMETERS
    held = (parameters * weights.itemsize if weights is not None else 0) + HEADROOM
    if held + render.unet_bytes() > free or held + render.vae_bytes(tiled=True) > free:
        largest = largest_fitting(render, free - held)
        fits = f"the largest size of that shape that fits is {largest[0]}x{largest[1]}" if largest else "no size fits"
        raise SDError(
            f"{render.width}x{render.height} needs about {gib(held + max(render.unet_bytes(), render.vae_bytes(True)))} of memory "
            f"and {place(device)} has {gib(free)} free: {fits} (with --vae-tiling); render at SD 1.5's 512x512 and enlarge "
            "with --hires-scale, or free memory"
        )
    if vae_tiling is None and held + render.vae_bytes(tiled=False) > free:
        log.warning(
            "decoding %dx%d at once needs about %s and %s has %s free: the VAE works in tiles (--vae-tiling)",
            render.width, render.height, gib(held + render.vae_bytes(tiled=False)), place(device), gib(free),
        )
        return True
    return bool(vae_tiling)


def largest_fitting(render: Render, budget: float) -> tuple[int, int] | None:
    """The largest size of the render's aspect ratio, multiples of 8, whose U-Net and tiled VAE fit `budget`."""

    def size(scale: float) -> tuple[int, int]:
        return tuple(max(64, int(side * scale) // LATENT_FACTOR * LATENT_FACTOR) for side in (render.width, render.height))

    def fits(scale: float) -> bool:
        width, height = size(scale)
        smaller = Render(width, height, render.batch, render.guided, render.dtype)
        return max(smaller.unet_bytes(), smaller.vae_bytes(tiled=True)) <= budget

    low, high = 0.0, 1.0  # the render itself does not fit
    if not fits(low):
        return None
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return size(low)


def free_bytes(device: torch.device) -> int | None:
    """Memory the render may take: the GPU's free memory on CUDA; on a CPU, Linux's MemAvailable, capped by the
    control group's limit (containers); None where unknown (MPS, other systems)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    available = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo)[1]) * 1024
    return min(available, cgroup_room())


def cgroup_room() -> float:
    """What this process's control group may still take (cgroup v2, else v1); infinite without a limit."""
    for limit, usage in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            text = Path("/sys/fs/cgroup", limit).read_text().strip()
            if text != "max":
                return int(text) - int(Path("/sys/fs/cgroup", usage).read_text())
        except (OSError, ValueError):
            continue
    return math.inf


def place(device: torch.device) -> str:
    return "this machine" if device.type == "cpu" else f"the {device.type.upper()} device"


def gib(size: float) -> str:
    return f"{size / GIB:,.1f} GiB"


def out_of_memory(error: BaseException) -> bool:
    """Whether an error is the allocator's, whatever the device: MemoryError, CUDA's or MPS's out-of-memory, or
    the CPU allocator's "can't allocate memory"."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in ("can't allocate memory", "out of memory"))


@contextmanager
def out_of_memory_as_error(width: int, height: int):
    """Turns running out of memory during a render that was allowed into one SDError line."""
    try:
        yield
    except (MemoryError, RuntimeError) as error:
        if not out_of_memory(error):
            raise
        raise SDError(f"ran out of memory rendering {width}x{height}: render smaller, pass --vae-tiling, or free memory") from None


def kept_loaded(cache: dict, keys: list, load) -> list:
    """What `load(key)` gives for each of `keys`, taken from `cache` where it is there. The cache then holds these
    alone: the others are dropped before anything new loads, so that two sets of weights never share memory."""
    kept = {key: cache[key] for key in keys if key in cache}
    cache.clear()
    cache.update(kept)
    for key in keys:
        if key not in cache:
            cache[key] = load(key)
    return [cache[key] for key in keys]


class on_device:
    """Moves a model to `device` for a stage; once the stage is done, to `idle_device` (if given), and hands its
    memory-mapped weights back to the file (sd/files/loader.py)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, idle_device):
        self.model, self.device, self.idle_device = model, device, idle_device

    def __enter__(self) -> torch.nn.Module:
        return self.model.to(self.device)

    def __exit__(self, *exc) -> None:
        if self.idle_device is not None:
            self.model.to(self.idle_device)
        release_mapped(self.model)
        release_memory()


def release_memory() -> None:
    """Gives back what a finished stage freed, so that it does not add to the next stage's peak: the weight
    cast buffers (118 MB for the U-Net in fp32) and, with glibc, the heap pages that the stage's many
    temporaries leave behind (0.3 GiB after a 512x512 U-Net run on CPU)."""
    release_scratch()
    trim_heap()
