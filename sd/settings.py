"""The settings of one render: their defaults, their checks, and AUTOMATIC1111's text form of them.

A1111 ("A1111") stores an image's settings as text, the "infotext", in a PNG's `parameters` chunk (in a JPEG's
or WebP's EXIF UserComment):

    the prompt, on as many lines as it has
    Negative prompt: the negative prompt, on as many lines as it has (no such line when it is empty)
    Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: ...

Fields are `Name: value` joined by ", ", in A1111's order, those without a value left out; a value holding a
comma, a colon or a newline is written as a JSON string. The reader also takes what A1111 1.9+ writes (the
schedule apart, "Sampler: DPM++ 2M, Schedule type: Karras") and what stable-diffusion.cpp writes (its own
sampler names, floats as 7.000000). With hires fix (`Hires upscale` or `Hires resize` written), `Size` is the first
pass's and `Denoising strength` the second pass's; stable-diffusion.cpp writes its upscaler's name in `Hires upscale`
and the scale in `Hires scale`.

Adding a setting means a field below, its check in __post_init__, and its infotext name in to_infotext(),
FIELD_READERS and INFOTEXT_NAMES.
"""

import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field

from .control import FIELD_NAME as CONTROLNET_FIELD, ControlNetUnit, read_unit
from .prompts.embeddings import infotext_name
from .files.lora import prompt_text, split_tags
from .errors import SDError
from .hires import DEFAULT_UPSCALER, UPSCALERS, check_side, hires_schedule, hires_target
from .files.loader import LATENT_FACTOR
from .prompts.conditioning import EMPHASIS_MODES, parse_prompt
from .sampling.samplers import SAMPLERS, check_options, display_name, karras_by_default
from .sampling.schedule import SD15, check_steps

MAX_SEED = 2**64 - 1  # torch.Generator's largest seed; AUTOMATIC1111 takes any integer (a batch: seed + i)
RANDOM_SEEDS = 2**32  # a random seed is drawn below this, as AUTOMATIC1111 draws its own: short enough to type
# what `sd generate` renders with unless told otherwise: AUTOMATIC1111's DPM++ 2M Karras in 20 steps (the library's
# generate() keeps DDPM in 50, the reference the parity tests compare with)
COMMAND_DEFAULTS = {"sampler": "dpmpp_2m", "karras": True, "steps": 20}
DEFAULT_MASK_BLUR = 4
MAX_CLIP_SKIP = 12  # SD 1.5's text encoder has 12 layers


@dataclass(frozen=True)
class Settings:
    """Every setting of a render; made only valid (each problem is one SDError naming its fix)."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 50
    sampler: str = "ddpm"  # a key of sd.sampling.samplers.SAMPLERS
    karras: bool = False  # Karras et al.'s noise levels, for the samplers that walk noise levels
    cfg_scale: float = 7.5
    seed: int | None = None  # None: a random one, recorded with the image
    width: int | None = None  # None: the size the model was trained at
    height: int | None = None
    strength: float | None = None  # image-to-image; None: 0.8, or 1 when an inpainting checkpoint repaints a mask
    eta: float = 0.0  # ddim only
    mask_blur: int | None = None  # inpainting with an ordinary checkpoint; None: DEFAULT_MASK_BLUR
    clip_skip: int = 1  # the text encoder's layer read, counted from the end (sd/models/clip.py)
    emphasis: str = "original"  # how the prompt's weights apply: a key of sd.prompts.conditioning.EMPHASIS_MODES
    # recorded with an image, not chosen: a mask repainted part of the input; the checkpoint
    inpainted: bool = False
    model_hash: str | None = None  # sha256(checkpoint)[:10], A1111's "Model hash"
    model: str | None = None  # the checkpoint's file name without its extension
    vae_hash: str | None = None  # sha256(VAE file)[:10], A1111's "VAE hash", where a VAE file replaced the checkpoint's
    vae: str | None = None  # the VAE file's name with its extension, as A1111 writes it
    ti_hashes: dict[str, str] = field(default_factory=dict)  # the embeddings the prompts used: name -> sha256[:12]
    lora_hashes: dict[str, str] = field(default_factory=dict)  # the LoRAs the prompt's tags used: name -> A1111's hash
    # hires fix, text-to-image only (sd/hires.py): width x height is the first pass; the second redraws it upscaled
    hires_scale: float | None = None  # the hires size is int(side * scale); None and no hires width/height: no hires fix
    hires_width: int | None = None  # or a size: one side keeps the aspect ratio; both: upscaled to cover, cut at the center
    hires_height: int | None = None
    hires_upscaler: str = DEFAULT_UPSCALER  # a key of sd.hires.UPSCALERS
    hires_steps: int = 0  # 0: as many as steps; they run as the last of a schedule of int(steps / hires_strength)
    hires_strength: float = 0.7  # A1111's "Denoising strength" of the second pass
    hires_sampler: str | None = None  # None: the first pass's sampler, with its noise levels
    hires_karras: bool = False  # Karras's noise levels for hires_sampler
    controlnets: tuple[ControlNetUnit, ...] = ()  # each with its control image, given to generate() beside them

    @property
    def hires(self) -> bool:
        return self.hires_scale is not None or self.hires_width is not None or self.hires_height is not None

    def __post_init__(self):
        object.__setattr__(self, "controlnets", tuple(self.controlnets))  # a list given is kept as a tuple
        if self.strength is not None and not 0 < self.strength <= 1:
            raise SDError(f"strength must be in (0, 1], got {self.strength}: 1 redraws the image completely, small values keep it")
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 0):  # nan or inf: an image of NaN, black
            raise SDError(f"cfg scale must be a number of 0 or more, got {self.cfg_scale}: 7.5 is usual, 1 turns guidance off")
        if self.sampler not in SAMPLERS:
            raise SDError(f"unknown sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        check_options(self.sampler, self.karras, self.eta)
        check_steps(self.steps, SD15.num_training_steps)
        for name, size in (("width", self.width), ("height", self.height)):
            if size is not None and (size < 64 or size % LATENT_FACTOR):
                fit = max(64, size - size % LATENT_FACTOR)
                raise SDError(f"{name} must be a multiple of 8 and at least 64, got {size}: try {fit}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise SDError(f"seed must be between 0 and {MAX_SEED}, got {self.seed}: or leave it out for a random one")
        if not 1 <= self.clip_skip <= MAX_CLIP_SKIP:
            raise SDError(f"clip skip must be between 1 and {MAX_CLIP_SKIP}, got {self.clip_skip}: 1 reads the last layer, 2 the one before (some fine-tunes want it)")
        if self.emphasis not in EMPHASIS_MODES:
            raise SDError(f"unknown emphasis {self.emphasis!r}: choose one of {', '.join(EMPHASIS_MODES)}")
        split_tags(self.prompt)  # a tag that cannot be read is refused before anything loads
        if self.emphasis != "none":
            for name, text in (("prompt", prompt_text(self.prompt)), ("negative prompt", self.negative_prompt)):
                try:
                    parse_prompt(text)  # a bad weight is refused before anything loads
                except SDError as error:
                    raise SDError(f"{name}: {error}") from None
        if self.mask_blur is not None and self.mask_blur < 0:
            raise SDError(f"mask blur must be 0 or more pixels, got {self.mask_blur}: 4 is usual, 0 pastes the original back with a hard edge")
        self.check_hires()

    def check_hires(self) -> None:
        if self.hires_upscaler not in UPSCALERS:
            raise SDError(f"unknown hires upscaler {self.hires_upscaler!r}: choose one of {', '.join(UPSCALERS)}")
        if not 0 < self.hires_strength <= 1:
            raise SDError(f"hires strength must be in (0, 1], got {self.hires_strength}: 0.7 is usual, small values keep the first pass")
        if self.hires_sampler is not None and self.hires_sampler not in SAMPLERS:
            raise SDError(f"unknown hires sampler {self.hires_sampler!r}: choose one of {', '.join(SAMPLERS)}, or leave it out for the same sampler")
        if self.hires_karras and self.hires_sampler is None:
            raise SDError("hires karras sets the noise levels of a hires sampler: name one, or leave hires karras off")
        if self.hires_sampler is not None:
            check_options(self.hires_sampler, self.hires_karras, eta=0.0)
        if self.hires_steps < 0:
            raise SDError(f"hires steps must be 0 (as many as steps) or more, got {self.hires_steps}")
        if not self.hires:
            return
        if self.hires_scale is not None and not 0 < self.hires_scale < math.inf:
            raise SDError(f"hires scale must be a number more than 0, got {self.hires_scale}: 2 doubles the width and the height")
        if self.hires_scale is not None and (self.hires_width or self.hires_height):
            raise SDError("give a hires scale or a hires width and height, not both")
        for name, side in (("hires width", self.hires_width), ("hires height", self.hires_height)):
            if side is not None:
                check_side(name, side)
        if self.strength is not None:
            raise SDError("hires fix is text-to-image: its strength is hires strength; leave out strength (and the input image)")
        steps = self.hires_steps or self.steps
        length = hires_schedule(steps, self.hires_strength)
        if length > SD15.num_training_steps - 1:
            raise SDError(f"{steps} hires steps at hires strength {self.hires_strength:g} make a schedule of {length} steps, more than "
                          f"{SD15.num_training_steps - 1}: raise hires strength or lower hires steps")
        if self.width is not None and self.height is not None:
            hires_target(self.width, self.height, self.hires_scale, self.hires_width, self.hires_height)

    def to_infotext(self) -> str:
        """The settings as A1111 writes them into an image (see the module's docstring)."""
        has_brackets = any(mark in text for text in (self.prompt, self.negative_prompt) for mark in "([")
        line = {
            "Steps": self.steps,
            "Sampler": display_name(self.sampler, self.karras),
            "CFG scale": number(self.cfg_scale),
            "Seed": self.seed,
            "Size": f"{self.width}x{self.height}" if self.width and self.height else None,
            "Model hash": self.model_hash,
            "Model": self.model,
            "VAE hash": self.vae_hash,
            "VAE": self.vae,
            "Denoising strength": number(self.hires_strength if self.hires else self.strength),
            "Clip skip": self.clip_skip if self.clip_skip >= 2 else None,
            # A1111's extra fields, after its fixed ones, in the order it adds them
            "Mask blur": self.mask_blur,
            "Inpainted": "yes" if self.inpainted else None,
            **self.hires_fields(),
            "Eta DDIM": number(self.eta) if self.eta else None,
            "Lora hashes": ", ".join(f"{infotext_name(name)}: {short}" for name, short in self.lora_hashes.items()) or None,
            "TI hashes": ", ".join(f"{infotext_name(name)}: {short}" for name, short in self.ti_hashes.items()) or None,
            **{f"ControlNet {index}": unit.infotext_value() for index, unit in enumerate(self.controlnets)},
            # as A1111: only where the mode makes a difference to brackets
            "Emphasis": EMPHASIS_MODES[self.emphasis] if self.emphasis != "original" and has_brackets else None,
        }
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"{NEGATIVE} {self.negative_prompt}")
        lines.append(", ".join(f"{name}: {quote(value)}" for name, value in line.items() if value is not None))
        return "\n".join(lines)

    def hires_fields(self) -> dict:
        if not self.hires:
            return {}
        if self.hires_scale is not None:
            size = {"Hires upscale": number(self.hires_scale)}
        else:  # A1111 writes 0 for a side not given
            size = {"Hires resize": f"{self.hires_width or 0}x{self.hires_height or 0}"}
        steps = {"Hires steps": self.hires_steps} if self.hires_steps else {}
        sampler = {"Hires sampler": display_name(self.hires_sampler, self.hires_karras)} if self.hires_sampler else {}
        return {**size, **steps, "Hires upscaler": UPSCALERS[self.hires_upscaler].a1111_name, **sampler}

    @classmethod
    def from_infotext(cls, text: str) -> "Settings":
        """The settings of an infotext; fields sd does not implement are left out (read_infotext() names them)."""
        return read_infotext(text).settings


@dataclass(frozen=True)
class Infotext:
    """An infotext taken apart: the prompts, every field as written, and the settings sd reads from them."""

    prompt: str
    negative_prompt: str
    fields: dict[str, str]
    settings: Settings
    ignored: list[str]  # the fields sd has no setting for, in their order


def number(value: float | None) -> str | None:
    """A float as A1111 shows one: 7 rather than 7.0, else the shortest text that reads back the same."""
    if value is None:
        return None
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(mark in text for mark in ",:\n") else text


def unquote(value: str) -> str:
    try:
        return json.loads(value) if value.startswith('"') else value
    except ValueError:  # not JSON after all: the text as written
        return value


# one field of the last line: a name, a colon, and the value up to the next comma or a JSON string
FIELD = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
NEGATIVE = "Negative prompt:"


def split_fields(line: str) -> dict[str, str] | None:
    """The fields of an infotext's last line, or None when the line is not a list of fields (a prompt)."""
    found, position = {}, 0
    while position < len(line):
        match = FIELD.match(line, position)
        if match is None or match.end() == position:
            return None
        name, value = match[1].strip(), match[2].strip()
        found[name] = unquote(value)
        position = match.end()
    return found if "Steps" in found else None


def split_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """An A1111 infotext's prompt, negative prompt and fields (as written); SDError when it has no fields line."""
    lines = text.strip("\n").split("\n")
    fields_found = split_fields(lines[-1])
    if fields_found is None:
        raise SDError("the settings text has no line of fields (Steps: ..., Sampler: ...): it was not written by A1111 or sd")
    prompt, negative = [], None
    for line in lines[:-1]:
        if negative is None and line.startswith(NEGATIVE):
            negative = [line.removeprefix(NEGATIVE).removeprefix(" ")]
        elif negative is not None:
            negative.append(line)
        else:
            prompt.append(line)
    return "\n".join(prompt), "\n".join(negative or []), fields_found


def read_infotext(text: str, leave_out: Collection[str] = ()) -> Infotext:
    """Takes an A1111 infotext apart into Settings; a field sd reads but whose value it cannot use is an SDError.
    The fields of the settings named in `leave_out` (those the caller sets itself) are not read."""
    prompt, negative, written = split_infotext(text)
    unread = {name for setting in leave_out for name in INFOTEXT_NAMES.get(setting, ())}
    if {"width", "height"} <= set(leave_out):
        unread.add("Size")
    fields_found = {name: value for name, value in written.items() if name not in unread}
    values, ignored = {"prompt": prompt, "negative_prompt": negative}, []
    if "controlnets" not in leave_out:
        values["controlnets"] = tuple(read_unit(name, value) for name, value in fields_found.items() if CONTROLNET_FIELD.match(name))
    for name, value in fields_found.items():
        if CONTROLNET_FIELD.match(name):
            continue
        if name in FIELD_READERS:
            values.update(FIELD_READERS[name](name, value))
        elif name not in READ_APART | NOT_SETTINGS and (name, value) not in SAME_AS_OURS:
            ignored.append(name)
    values.update(sampler_settings(fields_found.get("Sampler"), fields_found.get("Schedule type")))
    if HIRES_SIZE_FIELDS & set(written) and "strength" in values:  # A1111's hires fix writes its own strength there
        values["hires_strength"] = values.pop("strength")
    hires_sampler = sampler_settings(fields_found.get("Hires sampler"), fields_found.get("Hires schedule type"))
    values.update({f"hires_{name}": value for name, value in hires_sampler.items()})
    if "hires_width" in values or "hires_height" in values:  # stable-diffusion.cpp writes a scale beside a resize
        values.pop("hires_scale", None)
    if "Eta" in fields_found:  # A1111 writes it for the ancestral samplers' eta; sd did for DDIM's
        if values.get("sampler") == "ddim":
            values["eta"] = decimal("Eta", fields_found["Eta"])
        else:
            ignored.append("Eta")
    return Infotext(prompt, negative, written, Settings(**values), ignored)


def whole_number(name: str, value: str) -> int:
    """An integer, also as stable-diffusion.cpp writes some: 20.000000; read exactly (not through a float, which
    rounds seeds beyond 2**53)."""
    match = re.fullmatch(r"\s*([+-]?\d+)(?:\.0*)?\s*", value)
    if match is None:
        raise SDError(f"{name}: {value!r} in the image's settings is not a whole number")
    return int(match[1])


def decimal(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise SDError(f"{name}: {value!r} in the image's settings is not a number") from None


def size(name: str, value: str) -> dict[str, int]:
    match = re.fullmatch(r"\s*(\S+)\s*x\s*(\S+)\s*", value)
    if match is None:
        raise SDError(f"{name}: {value!r} in the image's settings is not WIDTHxHEIGHT")
    return {"width": whole_number(name, match[1]), "height": whole_number(name, match[2])}


def hires_upscale(name: str, value: str) -> dict:
    """A1111's hires scale; stable-diffusion.cpp writes its upscaler's name here (and the scale in Hires scale)."""
    try:
        return {"hires_scale": float(value)}
    except ValueError:
        return hires_upscaler(name, value)


def hires_upscaler(name: str, value: str) -> dict:
    """The upscaler by A1111's name ("Latent (nearest)") or ours ("latent-nearest")."""
    for key, upscaler in UPSCALERS.items():
        if value.strip().lower() in (key, upscaler.a1111_name.lower()):
            return {"hires_upscaler": key}
    names = ", ".join(upscaler.a1111_name for upscaler in UPSCALERS.values())
    raise SDError(f"{name}: the image's upscaler {value!r} is not one sd has: it has {names}, or give --hires-upscaler")


def hires_resize(name: str, value: str) -> dict:
    """A1111's hires width and height; 0 stands for a side not given."""
    sides = size(name, value)
    return {f"hires_{side}": pixels for side, pixels in sides.items() if pixels}


def named_hashes(name: str, value: str) -> dict[str, str]:
    """A1111's "name: hash, name: hash"; an entry without a colon is not one."""
    entries = (entry.rpartition(":") for entry in value.split(","))
    return {item.strip(): short.strip() for item, colon, short in entries if colon}


def emphasis_mode(name: str, value: str) -> str:
    """Ours from A1111's name of an emphasis mode ("No norm" -> "no-norm")."""
    modes = {a1111.lower(): ours for ours, a1111 in EMPHASIS_MODES.items()}
    if value.strip().lower() not in modes:
        raise SDError(f"{name}: {value!r} in the image's settings is not an emphasis mode: {', '.join(EMPHASIS_MODES.values())}")
    return modes[value.strip().lower()]


def sampler_settings(name: str | None, schedule: str | None) -> dict:
    """`sampler` and `karras` from A1111's sampler name ("DPM++ 2M Karras", "Euler a", "UniPC"), its 1.9+
    `Schedule type` ("Karras", "Automatic"), or one of our own or stable-diffusion.cpp's ("dpmpp_2m", "dpm++2m")."""
    if name is None or name == SAME_SAMPLER:
        return {}
    plain = re.sub(r"\s+karras$", "", name.strip(), flags=re.IGNORECASE)
    key = SAMPLER_NAMES.get(normalized(plain))
    if key is None:
        names = ", ".join(sampler.a1111_name for sampler in SAMPLERS.values())
        raise SDError(f"the image's sampler {name!r} is not one sd has: it has {names} (and their Karras forms), or give --sampler")
    if plain != name.strip():
        return {"sampler": key, "karras": True}
    if schedule is None:  # older A1111 and sd name the Karras schedule in the sampler's name
        return {"sampler": key, "karras": False}
    if schedule.lower() not in ("karras", "automatic"):
        raise SDError(f"the image's schedule type {schedule!r} is not one sd has: Karras or Automatic (each sampler's own)")
    return {"sampler": key, "karras": schedule.lower() == "karras" or karras_by_default(key)}


def normalized(name: str) -> str:
    """A sampler's name with case, spaces, underscores and "k_" left out, "++" as "pp": dpmpp2m, eulera."""
    return re.sub(r"[\s_]", "", name.lower().removeprefix("k_").replace("++", "pp"))


SAMPLER_NAMES = {normalized(spelling): key for key, sampler in SAMPLERS.items() for spelling in (key, sampler.a1111_name)}

FIELD_READERS = {
    "Steps": lambda name, value: {"steps": whole_number(name, value)},
    "CFG scale": lambda name, value: {"cfg_scale": decimal(name, value)},
    "Seed": lambda name, value: {"seed": whole_number(name, value)},
    "Size": size,
    "Model hash": lambda name, value: {"model_hash": value},
    "Model": lambda name, value: {"model": value},
    "VAE hash": lambda name, value: {"vae_hash": value},
    "VAE": lambda name, value: {"vae": value},
    "Denoising strength": lambda name, value: {"strength": decimal(name, value)},
    "Mask blur": lambda name, value: {"mask_blur": whole_number(name, value)},
    "Inpainted": lambda name, value: {"inpainted": value == "yes"},
    "Eta DDIM": lambda name, value: {"eta": decimal(name, value)},
    "Hires upscale": hires_upscale,
    "Hires scale": lambda name, value: {"hires_scale": decimal(name, value)},  # stable-diffusion.cpp's
    "Hires resize": hires_resize,
    "Hires steps": lambda name, value: {"hires_steps": whole_number(name, value)},
    "Hires upscaler": hires_upscaler,
    "Clip skip": lambda name, value: {"clip_skip": whole_number(name, value)},
    "Emphasis": lambda name, value: {"emphasis": emphasis_mode(name, value)},
    "TI hashes": lambda name, value: {"ti_hashes": named_hashes(name, value)},
    "Lora hashes": lambda name, value: {"lora_hashes": named_hashes(name, value)},
}
HIRES_SIZE_FIELDS = {"Hires upscale", "Hires scale", "Hires resize"}
# the infotext fields each setting is read from (width and height: from Size, the two together)
INFOTEXT_NAMES = {
    "steps": ("Steps",), "sampler": ("Sampler", "Schedule type"), "cfg_scale": ("CFG scale",), "seed": ("Seed",),
    "strength": ("Denoising strength",), "mask_blur": ("Mask blur",), "eta": ("Eta DDIM", "Eta"),
    **{name: tuple(HIRES_SIZE_FIELDS) for name in ("hires_scale", "hires_width", "hires_height")},
    "hires_upscaler": ("Hires upscaler",), "hires_steps": ("Hires steps",), "hires_strength": ("Denoising strength",),
    "hires_sampler": ("Hires sampler", "Hires schedule type"),
    "clip_skip": ("Clip skip",), "emphasis": ("Emphasis",),
}
READ_APART = {"Sampler", "Schedule type", "Eta", "Hires sampler", "Hires schedule type"}  # they depend on each other
SAME_SAMPLER = "Use same sampler"  # A1111's Hires sampler when none is chosen
NOT_SETTINGS = {"Version", "User"}  # about the program or its user, not the image
SAME_AS_OURS = {("RNG", "CPU")}  # what sd does anyway: noise drawn on the CPU
