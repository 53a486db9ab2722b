"""What a render asks of a ControlNet (sd/models/controlnet.py): the file, how strongly and over which steps it guides,
how its control image is prepared, and the infotext field AUTOMATIC1111's ControlNet extension writes for it:

    ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1, Resize Mode: Just Resize, ..."

The control image is resized to the output size, its aspect ratio not kept (the extension's "Just Resize"), with
Lanczos as diffusers resizes it; a preprocessor then runs on the resized image.
"""

import math
import re
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import SDError, counted
from .files.hashes import old_hash
from .files.loader import load_controlnet, read_controlnet
from .memory import kept_loaded, on_device
from .models.controlnet import Control, ControlNet, Guide, compatible

# Preprocessors that need no model of their own. canny: OpenCV's Canny edge detector, the one the original
# ControlNet's annotator runs (thresholds 100 and 200 in its demo); none: the image is the map already.
PREPROCESSORS = ("none", "canny")
RESIZE_MODE = "Just Resize"
# The extension's control modes: guess mode is its "ControlNet is more important" (the conditional half alone
# guided; diffusers' scales, not the extension's 0.825 ** (12 - i))
CONTROL_MODES = {False: "Balanced", True: "ControlNet is more important"}
FIELD_NAME = re.compile(r"^ControlNet \d+$")

# The ControlNets of the last render that used any: (path, device, dtype) -> ControlNet.
_loaded_controlnets: dict[tuple, ControlNet] = {}


@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet of a render and how it guides it; made only valid."""

    model: str  # the file; read from an infotext, the name it was recorded under
    strength: float = 1.0  # the residuals' scale (the extension's Weight)
    start: float = 0.0  # the share of the steps before it starts guiding
    end: float = 1.0  # and after which it stops
    guess_mode: bool = False
    preprocess: str = "none"  # a PREPROCESSORS entry
    canny_low: int = 100  # canny's thresholds on the gradient's size: below low no edge, above high an edge
    canny_high: int = 200
    model_hash: str | None = None  # recorded with an image: A1111's short hash of the file (sd/files/hashes.py, old_hash)

    def __post_init__(self):
        if not (math.isfinite(self.strength) and self.strength >= 0):
            raise SDError(f"control strength must be a number of 0 or more, got {self.strength:g}: 1 is usual, 0 turns the ControlNet off")
        if not 0 <= self.start < self.end <= 1:
            raise SDError(f"control start and end are shares of the steps, 0 <= start < end <= 1, got {self.start:g} and {self.end:g}")
        if self.preprocess not in PREPROCESSORS:
            raise SDError(f"unknown control preprocessor {self.preprocess!r}: choose one of {', '.join(PREPROCESSORS)} "
                          "(depth and pose maps need their own models: make them elsewhere and give them with none)")
        if not 0 <= self.canny_low <= self.canny_high:
            raise SDError(f"canny thresholds must be 0 <= low <= high, got {self.canny_low} and {self.canny_high}: 100 and 200 are usual")

    @property
    def name(self) -> str:
        return Path(self.model).stem

    def infotext_value(self) -> str:
        """The extension's "Key: value, ..." text of this unit (one field's value, quoted by the infotext)."""
        model = f"{self.name} [{self.model_hash}]" if self.model_hash else self.name
        thresholds = {"Threshold A": self.canny_low, "Threshold B": self.canny_high} if self.preprocess == "canny" else {}
        parts = {"Module": self.preprocess, "Model": model, "Weight": number(self.strength), "Resize Mode": RESIZE_MODE,
                 **thresholds, "Guidance Start": number(self.start), "Guidance End": number(self.end),
                 "Control Mode": CONTROL_MODES[self.guess_mode]}
        return ", ".join(f"{key}: {value}" for key, value in parts.items())


def number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def read_unit(field: str, text: str) -> ControlNetUnit:
    """A unit from the extension's text of one ControlNet field ("Module: canny, Model: name [hash], ...")."""
    parts = dict(part.partition(":")[::2] for part in text.split(", "))
    parts = {key.strip(): value.strip() for key, value in parts.items()}
    model = re.fullmatch(r"(.*?)(?: \[([0-9a-fA-F]+)\])?", parts.get("Model", ""))
    module = parts.get("Module", "none")
    if module not in PREPROCESSORS:
        raise SDError(f"{field}: the image's ControlNet preprocessor {module!r} is not one sd has ({', '.join(PREPROCESSORS)})")
    modes = {mode: guess for guess, mode in CONTROL_MODES.items()}
    mode = parts.get("Control Mode", CONTROL_MODES[False])
    if mode not in modes:
        raise SDError(f"{field}: the image's ControlNet control mode {mode!r} is not one sd has ({', '.join(modes)})")
    try:
        thresholds = {"canny_low": int(float(parts.get("Threshold A", 100))), "canny_high": int(float(parts.get("Threshold B", 200)))} if module == "canny" else {}
        return ControlNetUnit(model[1], float(parts.get("Weight", 1)), float(parts.get("Guidance Start", 0)), float(parts.get("Guidance End", 1)),
                              modes[mode], module, **thresholds, model_hash=model[2])
    except ValueError:
        raise SDError(f"{field}: {text!r} in the image's settings has a value that is not a number") from None


def control_image(image: Image.Image, unit: ControlNetUnit, width: int, height: int) -> torch.Tensor:
    """The map a ControlNet reads: the image resized to width x height ("Just Resize"), preprocessed; (1, 3, H, W)
    in [0, 1]."""
    resized = np.asarray(image.convert("RGB").resize((width, height), Image.LANCZOS))
    if unit.preprocess == "canny":
        resized = canny(resized, unit.canny_low, unit.canny_high)
    # (H, W, 3) uint8 -> (1, 3, H, W)
    return torch.from_numpy(resized.astype(np.float32) / 255.0).permute(2, 0, 1)[None]


def canny(pixels: np.ndarray, low: int, high: int) -> np.ndarray:
    """Canny's edges of an RGB image (H, W, 3) uint8 as a white-on-black RGB image of the same shape, by OpenCV as
    the original ControlNet's annotator finds them (the gradient of the channel where it is largest)."""
    import cv2

    edges = cv2.Canny(pixels, low, high)  # (H, W, 3) -> (H, W), 0 or 255
    return np.repeat(edges[:, :, None], 3, axis=2)


def check_control(units: Sequence[ControlNetUnit], images: int, controlnets: Sequence[ControlNet] | None) -> None:
    """The checks that need no model: one control image for each ControlNet, and each ControlNet's file an SD 1.5
    ControlNet (its header alone is read)."""
    if images != len(units):
        raise SDError(f"each ControlNet needs a control image, and each control image a ControlNet: got {counted(len(units), 'ControlNet')} and {counted(images, 'image')}")
    if controlnets is not None and len(controlnets) != len(units):
        raise SDError(f"{len(controlnets)} loaded ControlNets given for {len(units)} ControlNet settings: give one for each")
    if controlnets is None:
        for unit in units:
            read_controlnet(unit.model)


def check_controlnets_fit(controlnets: Sequence[ControlNet], unet: torch.nn.Module) -> None:
    for controlnet in controlnets:
        if not compatible(controlnet, unet.config):
            raise SDError("the ControlNet was made for another U-Net than the checkpoint's (its widths or text context differ): "
                          "use an SD 1.5 ControlNet with an SD 1.5 checkpoint")


def recorded_unit(unit: ControlNetUnit) -> ControlNetUnit:
    """The unit as an image records it: with its file's hash, where the file is there to read."""
    if unit.model_hash is None and Path(unit.model).is_file():
        return replace(unit, model_hash=old_hash(unit.model))
    return unit


def cached_controlnets(paths: list[str], device: torch.device, dtype: torch.dtype) -> list[ControlNet]:
    """The ControlNets of these files, loaded once for later renders with the same ones; the others are dropped."""
    keys = [(Path(path).resolve(), device, dtype) for path in paths]
    return kept_loaded(_loaded_controlnets, keys, lambda key: load_controlnet(key[0], device=device, dtype=dtype))


class RenderControl:
    """The ControlNets of a render and their control images, which guide each sampling pass at its own size."""

    def __init__(self, units: Sequence[ControlNetUnit], controlnets: Sequence[ControlNet], images: list[Image.Image], stages):
        self.units, self.controlnets, self.images = units, controlnets, images
        self.stages = stages  # sd/pipeline.py Stages: where and in which dtype the ControlNets run

    @contextmanager
    def guiding(self, width: int, height: int, calls: int):
        """The guidance of a pass of `calls` U-Net calls at width x height (None without ControlNets), the
        ControlNets on the device meanwhile; their control images' features are computed once for the pass."""
        if not self.units:
            yield None
            return
        with ExitStack() as stack:
            guides = []
            for controlnet, image, unit in zip(self.controlnets, self.images, self.units):
                controlnet = stack.enter_context(on_device(controlnet, self.stages.device, self.stages.idle_device))
                hint = controlnet.encode_hint(control_image(image, unit, width, height).to(self.stages.device, self.stages.dtype))
                guides.append(Guide(controlnet, hint, unit.strength, unit.start, unit.end, unit.guess_mode))
            yield Control(guides, calls)
