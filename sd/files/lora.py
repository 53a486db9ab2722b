"""LoRA and LyCORIS files: the `<lora:NAME:MULT>` tags of a prompt, the files they name, and the weight change
each module of a file makes, as AUTOMATIC1111 ("A1111") reads them.

Tags (cut from the prompt before anything else reads it; the negative prompt keeps them as text, as in A1111):
`<lora:NAME>`, `<lora:NAME:MULT>`, `<lora:NAME:TE:UNET>`, `<lora:NAME:TE:UNET:DYN>`, and the named forms `te=`,
`unet=`, `dyn=`; `<lyco:...>` is the same. TE multiplies the text encoder's changes, UNET (default TE) the U-Net's;
DYN keeps only the first DYN ranks of plain LoRA modules. NAME is a file's name without its extension, in the LoRA
folder (data/lora/ by default) or its subfolders.

A file holds modules, each a group of tensors under one name (the layer's name in kohya's form: diffusers' module
name with "." as "_", after `lora_unet_` or `lora_te_`). Each module changes its layer's weight W by
multiplier * scale * dW, where scale = alpha / rank (alpha missing: 1; a `scale` tensor: that):

- LoRA and LoCon (kohya, LyCORIS): dW = up @ down, over the flattened kernels (a 3x3 `down` for convolutions);
  with a `lora_mid` (CP decomposition): up, mid and down chained.
- LoHa: dW = (w1_a @ w1_b) * (w2_a @ w2_b), elementwise; rank = w1_b's rows.
- LoKr: dW = kron(w1, w2), each factor whole or a product of two; rank from a `_b` factor, without one scale 1.
- Full: dW = diff (and the bias's diff_b), scale 1.
- DoRA (a `dora_scale` beside any of these): W' = dora_scale * (W + s dW) / ||W + s dW||, the norm taken over the
  axes where dora_scale has size 1; the change is multiplier * (W' - W).
- diffusers' and peft's files (`unet.`/`text_encoder.` names with lora_A/lora_B or lora.down/lora.up) are read
  as kohya's.

Files are read without running code: .safetensors memory-mapped, .pt/.ckpt/.bin with
torch.load(weights_only=True) and nothing more allowed.
"""

import logging
import math
import pickle
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from . import hashes
from ..errors import SDError
from .converter import MappedSafetensors, refuse_code
from . import DATA_DIR

log = logging.getLogger("sd")

DEFAULT_FOLDER = DATA_DIR / "lora"
SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
NETWORK_TYPES = ("lora", "lyco")  # A1111's LoRA extra network and its alias
# A1111's extra-network tag: <type:arguments>
TAG = re.compile(r"<(\w+):([^>]+)>")
FILE_FIX = "use an SD 1.5 LoRA or LyCORIS .safetensors"
# the tensors a module may hold: LoRA (kohya, LyCORIS LoCon, CP), LoHa, LoKr, full, and the scale and DoRA of any
PARTS = {
    "lora_up.weight", "lora_down.weight", "lora_mid.weight", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1",
    "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "diff", "diff_b",
    "alpha", "scale", "dora_scale",
}
# kohya's names of layers that SD 1.5 does not have, and the model that has them
OTHER_MODEL_NAMES = [
    (r"^lora_te[12]_", "an SDXL LoRA (two text encoders)"),
    (r"^lora_unet_(input_blocks|middle_block|output_blocks|label_emb)_", "an SDXL LoRA (kohya names SDXL's U-Net layers so)"),
]


@dataclass(frozen=True)
class LoraTag:
    """One LoRA a prompt asks for: its name and the multipliers of its text-encoder and U-Net changes."""

    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None  # the ranks kept of plain LoRA modules; None: all


def split_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its extra-network tags (as CLIP reads it; other networks' tags, `<hypernet:...>`, are cut
    too, as A1111 cuts them) and the LoRAs they ask for, in order."""
    tags = []

    def cut(match: re.Match) -> str:
        if match[1] in NETWORK_TYPES:
            tags.append(read_tag(match[0], match[2].split(":")))
        return ""

    return TAG.sub(cut, prompt), tags


def warn_of_other_networks(prompt: str) -> None:
    """One line for each tag of a network that is not a LoRA (A1111's hypernetworks, ...), which sd leaves out."""
    for kind, arguments in TAG.findall(prompt):
        if kind not in NETWORK_TYPES:
            log.warning("ignored <%s:%s> in the prompt: sd has no %s networks", kind, arguments, kind)


def prompt_text(prompt: str) -> str:
    """The prompt as the text encoder reads it: without its extra-network tags."""
    return TAG.sub("", prompt)


def read_tag(tag: str, arguments: list[str]) -> LoraTag:
    """A1111's reading: positional NAME, TE (1), UNET (TE), DYN; an argument with "=" is named instead."""
    positional = [argument for argument in arguments if "=" not in argument]
    named = dict(argument.split("=", 1) for argument in arguments if "=" in argument)
    unknown = set(named) - {"te", "unet", "dyn"}
    if not positional or unknown:
        raise SDError(f"{tag}: write <lora:NAME:MULTIPLIER>, <lora:NAME:TE:UNET> or <lora:NAME:unet=MULTIPLIER> (te=, unet=, dyn=)")
    try:
        te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
        unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
        dyn = named.get("dyn", positional[3] if len(positional) > 3 else None)
        dyn = int(dyn) if dyn is not None else None
        if not (math.isfinite(te) and math.isfinite(unet)):
            raise ValueError("nan or inf")  # a black image, all its latents NaN
    except ValueError:
        raise SDError(f"{tag}: the multipliers must be finite numbers and dyn a whole number") from None
    return LoraTag(positional[0], te, unet, dyn)


class LoraLibrary(dict):
    """The LoRA files by name (the file name without its extension) of a folder and its subfolders, and
    files given one by one."""

    def __init__(self, folder: str | Path | None = None, files: list[str | Path] = ()):
        super().__init__()
        self.folder = Path(folder) if folder is not None else DEFAULT_FOLDER
        if folder is not None and not self.folder.is_dir():
            problem = "is a file" if self.folder.exists() else "does not exist"
            raise SDError(f"LoRA folder {self.folder} {problem}: give a folder of LoRA files to --lora-dir")
        found = sorted(self.folder.rglob("*")) if self.folder.is_dir() else []
        for path in found:
            if path.suffix.lower() in SUFFIXES and path.is_file():
                if path.stem in self:
                    log.warning("LoRA %s has the name of an earlier file, which is kept: rename one of them", path)
                    continue
                self[path.stem] = path
        for path in map(Path, files):
            if not path.is_file():
                raise SDError(f"LoRA file {path} not found: give the path of a .safetensors, .pt or .ckpt LoRA")
            self[path.stem] = path

    def find(self, name: str) -> Path:
        if name not in self:
            raise SDError(f"LoRA {name!r} not found in {self.folder}: put {name}.safetensors there, or give --lora-dir or --lora FILE")
        return self[name]


@dataclass(eq=False)
class Module:
    """One module of a LoRA file: the tensors that change one layer, by their kind (`lora_down.weight`, `alpha`,
    `hada_w1_a`, ...)."""

    name: str  # kohya's: lora_unet_down_blocks_0_attentions_0_proj_in
    tensors: dict[str, torch.Tensor] = field(repr=False)

    @property
    def kind(self) -> str | None:
        """"lora" (LoCon too), "loha", "lokr", "full", or None for a module sd does not read (IA3, OFT, GLoRA, ...)."""
        keys = self.tensors.keys()
        if {"lora_up.weight", "lora_down.weight"} <= keys:
            return "lora"
        if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= keys:
            return "loha"
        if keys & {"lokr_w1", "lokr_w1_a"} and keys & {"lokr_w2", "lokr_w2_a"}:
            return "lokr"
        return "full" if "diff" in keys else None

    def scale(self) -> float:
        """alpha / rank, as A1111: a `scale` tensor wins; alpha missing (or no rank, as a whole LoKr): 1."""
        if "scale" in self.tensors:
            return float(self.tensors["scale"])
        alpha, rank = self.tensors.get("alpha"), self.rank()
        return float(alpha) / rank if alpha is not None and rank else 1.0

    def rank(self) -> int | None:
        t = self.tensors
        for key in ("lora_down.weight", "hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
            if key in t:
                return t[key].shape[0]
        return None

    def add_to(self, target: torch.Tensor, multiplier: float, weight: torch.Tensor | None = None, dyn: int | None = None) -> None:
        """Adds multiplier * the change to a layer's weight `target` (fp32, contiguous), in place. A plain LoRA's
        product goes straight into it with its scale folded into the product's factor (one addmm, no dW of its own:
        for a typical LoRA, the largest share of merging's time)."""
        if self.kind == "lora" and not self.tensors.keys() & {"lora_mid.weight", "dora_scale"}:
            up, down = (factor.to(target.device) for factor in self.lora_factors(dyn))
            # (out, in * kh * kw) += (out, r) @ (r, in * kh * kw)
            target.view(target.shape[0], -1).addmm_(up, down, alpha=multiplier * self.scale())
        else:
            target.add_(self.change(target.shape, weight, dyn).to(target.device), alpha=multiplier)

    def change(self, shape: torch.Size, weight: torch.Tensor | None = None, dyn: int | None = None) -> torch.Tensor:
        """The change to a layer's weight of `shape` at multiplier 1, fp32: scale * dW, or with DoRA W' - W, which
        needs the layer's weight `weight` (fp32)."""
        update = self.delta(dyn).reshape(shape) * self.scale()
        if "dora_scale" not in self.tensors:
            return update
        magnitude = self.tensors["dora_scale"].float()
        if magnitude.dim() == 1:  # peft's magnitude vector: one per output
            magnitude = magnitude.reshape(-1, *[1] * (weight.dim() - 1))
        merged = weight + update
        # the norm over the axes along which dora_scale has one value: per output (dora_scale (out, 1, ...)) or per
        # input (1, in, ...)
        axes = [axis for axis, size in enumerate(magnitude.shape) if size == 1]
        norm = merged.norm(dim=axes, keepdim=True)
        return merged * (magnitude.reshape(norm.shape) / norm) - weight

    def lora_factors(self, dyn: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A LoRA's up (out, r) and down (r, in * kh * kw) in fp32; with A1111's dyn, their first ranks only."""
        up, down = self.tensors["lora_up.weight"].flatten(1).float(), self.tensors["lora_down.weight"].flatten(1).float()
        return (up, down) if dyn is None else (up[:, :dyn], down[:dyn])

    def delta(self, dyn: int | None = None) -> torch.Tensor:
        """dW in fp32, as the factors give it: (out, in) or (out, in, kh, kw) or flat."""
        t = {key: value.float() for key, value in self.tensors.items()}
        kind = self.kind
        if kind == "lora":
            up, down = self.lora_factors(dyn)
            if "lora_mid.weight" in t:
                # CP: up (out, r, 1, 1), mid (r, r, kh, kw), down (r, in, 1, 1) -> (out, in, kh, kw)
                return torch.einsum("pi,ijkl,jr->prkl", up, t["lora_mid.weight"], down)
            # (out, r) @ (r, in * kh * kw) -> (out, in * kh * kw)
            return up @ down
        if kind == "loha":
            first = factor_product(t["hada_w1_a"], t["hada_w1_b"], t.get("hada_t1"))
            second = factor_product(t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t2"))
            return first * second
        if kind == "lokr":
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            w2 = t["lokr_w2"] if "lokr_w2" in t else factor_product(t["lokr_w2_a"], t["lokr_w2_b"], t.get("lokr_t2"))
            if w2.dim() == 4:  # (a, b) -> (a, b, 1, 1), so that the product is (a * out2, b * in2, kh, kw)
                w1 = w1[:, :, None, None]
            return torch.kron(w1, w2)
        return t["diff"]  # a full module (read_lora refuses any other)

    def bias_change(self) -> torch.Tensor | None:
        """A full module's change to the bias (diff_b), fp32; None for the others."""
        bias = self.tensors.get("diff_b")
        return bias.float() if bias is not None else None


def factor_product(a: torch.Tensor, b: torch.Tensor, core: torch.Tensor | None) -> torch.Tensor:
    """a @ b, (out, r) @ (r, in * kh * kw); with a Tucker `core` (r, r, kh, kw): a (r, out), b (r, in), chained
    through the core -> (out, in, kh, kw)."""
    if core is None:
        return a @ b.flatten(1)
    return torch.einsum("ijkl,jr,ip->prkl", core, b.flatten(1), a.flatten(1))


@dataclass(eq=False)
class LoraFile:
    """A LoRA file's modules by kohya's name, and what identifies the file."""

    name: str
    path: Path
    modules: dict[str, Module] = field(repr=False)
    metadata: dict[str, str] = field(repr=False)

    @cached_property
    def short_hash(self) -> str:
        """A1111's 12-digit hash: the `sshs_model_hash` metadata kohya writes, else the sha256 of a .safetensors'
        tensor data (after the header, so that editing the metadata keeps it), of any other file whole."""
        if self.metadata.get("sshs_model_hash"):
            return self.metadata["sshs_model_hash"][:12]
        if self.path.suffix.lower() == ".safetensors":
            return hashes.tensor_sha256(self.path)[:12]
        return hashes.sha256(self.path)[:12]


def read_lora(name: str, path: Path) -> LoraFile:
    """The file's modules, its tensors memory-mapped (a .safetensors) or read without running code (a pickle)."""
    tensors, metadata = read_tensors(path)
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        stem, part = kohya_key(key, path)
        modules[stem][part] = tensor
    if not modules:
        raise SDError(f"LoRA {path} holds no tensors; {FILE_FIX}")
    for stem, parts in modules.items():
        check_module(name, Module(stem, parts))
    return LoraFile(name, path, {stem: Module(stem, parts) for stem, parts in modules.items()}, metadata)


def check_module(name: str, module: Module) -> None:
    """An SDError for a module of another model's layer, of a kind sd does not read, or with a tensor it would leave
    unread."""
    for pattern, model in OTHER_MODEL_NAMES:
        if re.search(pattern, module.name):
            raise SDError(f"LoRA {name}: {module.name} is no layer of SD 1.5: it is {model}; {FILE_FIX}")
    unknown = sorted(set(module.tensors) - PARTS)
    if module.kind is None or unknown:
        raise SDError(f"LoRA {name}: module {module.name} holds {', '.join(unknown or sorted(module.tensors))}, which sd does not read "
                      f"(it reads LoRA, LoCon, LoHa, LoKr, DoRA and full modules); {FILE_FIX}")


def read_tensors(path: Path) -> tuple[Mapping[str, torch.Tensor], dict[str, str]]:
    if path.suffix.lower() == ".safetensors":
        try:
            mapped = MappedSafetensors(path)
        except SDError:
            raise SDError(f"cannot read LoRA {path}: the file is truncated or not a .safetensors; download it again") from None
        return mapped, mapped.metadata
    try:
        # weights_only: tensors and plain containers; anything else is refused before it runs
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        refuse_code(str(path), path, "a LoRA file", FILE_FIX)
        raise SDError(f"cannot read LoRA {path}: it is damaged or not a PyTorch file; download it again") from None
    except Exception as error:  # a damaged file fails in many ways, each an error of the reader's own
        raise SDError(f"cannot read LoRA {path}: it is damaged ({error.__class__.__name__}); download it again") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise SDError(f"LoRA {path} holds a {type(loaded).__name__}, not a dictionary of tensors; {FILE_FIX}")
    return {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}, {}


# diffusers' and peft's names: component, module, and the factor (peft lora_A/lora_B, diffusers' lora.down/lora.up,
# older lora_linear_layer.down/up) or the alpha
DIFFUSERS_KEY = re.compile(r"^(unet|text_encoder)\.(.+?)\.(?:(lora_A|lora\.down|lora_linear_layer\.down|lora_B|lora\.up|lora_linear_layer\.up)\.weight|(alpha))$")
# diffusers' oldest: attn1.processor.to_q_lora.down.weight
PROCESSOR_KEY = re.compile(r"\.processor\.(to_[qkv]|to_out)_lora\.(down|up)\.weight$")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def kohya_key(key: str, path: Path) -> tuple[str, str]:
    """A tensor's module in kohya's form and its part (`lora_down.weight`, `alpha`, `hada_w1_a`, ...)."""
    if key.startswith("lora_"):
        stem, dot, part = key.partition(".")
        if dot:
            return stem, part
    key = PROCESSOR_KEY.sub(lambda m: f".{m[1].replace('to_out', 'to_out.0')}.lora.{m[2]}.weight", key)
    match = DIFFUSERS_KEY.match(key)
    if match is None:
        hint = "; it is for SDXL" if key.startswith(("text_encoder_2.", "lora_te1_", "lora_te2_")) else ""
        raise SDError(f"LoRA {path}: {key} is not a LoRA tensor's name (kohya's lora_unet_/lora_te_ names, or diffusers' "
                      f"unet./text_encoder. ones with lora_A/lora_B){hint}; {FILE_FIX}")
    component, module, factor, alpha = match.groups()
    if component == "text_encoder" and not module.startswith("text_model."):  # saved from transformers 5's CLIPTextModel
        module = "text_model." + module
    part = "alpha" if alpha else "lora_down.weight" if factor.endswith(("A", "down")) else "lora_up.weight"
    return KOHYA_PREFIXES[component] + module.replace(".", "_"), part


def prompt_loras(prompt: str, library: LoraLibrary) -> list[tuple[LoraTag, LoraFile]]:
    """The LoRAs the prompt's tags ask for, each file read (not yet its tensors' data); an SDError for a name not
    in the library or a file that cannot be read."""
    return [(tag, read_lora(tag.name, library.find(tag.name))) for tag in split_tags(prompt)[1]]
