"""Reads original (CompVis) SD 1.x checkpoints and renames their tensors to ours.

The mapping is a few rules rather than a table: a prefix says which of our four models a tensor
belongs to, renames turn the original layer names into ours, and the query, key and value
projections of each self-attention are concatenated into its one fused `in_proj`.
"""

import ctypes
import json
import math
import mmap
import pickle
import re
import zipfile
from pathlib import Path

import torch
from ..errors import SDError

# Original prefix -> ours. The first one that matches wins.
PREFIXES = [
    ("model.diffusion_model.", "diffusion."),
    ("first_stage_model.encoder.", "encoder."),
    ("first_stage_model.quant_conv.", "encoder.quant_conv."),
    ("first_stage_model.decoder.", "decoder."),
    ("first_stage_model.post_quant_conv.", "decoder.post_quant_conv."),
    ("cond_stage_model.transformer.text_model.", "clip."),
    ("cond_stage_model.transformer.", "clip."),  # checkpoints saved with transformers < 4.18
    ("control_model.", "controlnet."),  # a ControlNet's file (sd/models/controlnet.py)
]

# Layer renames, applied in order to the name after its prefix is replaced.
RENAMES = [
    # U-Net, and a ControlNet's copy of its encoder half
    (r"^(diffusion|controlnet)\.time_embed\.0\.", r"\1.time_embedding.linear_1."),
    (r"^(diffusion|controlnet)\.time_embed\.2\.", r"\1.time_embedding.linear_2."),
    (r"^diffusion\.out\.0\.", "diffusion.norm_out."),
    (r"^diffusion\.out\.2\.", "diffusion.conv_out."),
    (r"\.in_layers\.0\.", ".norm1."),
    (r"\.in_layers\.2\.", ".conv1."),
    (r"\.emb_layers\.1\.", ".time_proj."),
    (r"\.out_layers\.0\.", ".norm2."),
    (r"\.out_layers\.3\.", ".conv2."),
    (r"\.skip_connection\.", ".shortcut."),
    (r"\.op\.", ".conv."),
    (r"\.attn1\.to_out\.0\.", ".self_attention.out_proj."),
    (r"\.attn2\.to_out\.0\.", ".cross_attention.out_proj."),
    (r"\.attn2\.to_([qkv])\.", r".cross_attention.\1_proj."),
    (r"\.ff\.net\.0\.proj\.", ".feed_forward.proj_in."),
    (r"\.ff\.net\.2\.", ".feed_forward.proj_out."),
    # ControlNet's own layers: the hint encoder (its convolutions at the original's even indices), the 1x1
    # convolutions out of each encoder stage and out of the middle block
    (r"^controlnet\.input_hint_block\.", "controlnet.hint."),
    (r"^controlnet\.zero_convs\.(\d+)\.0\.", r"controlnet.zero_convs.\1."),
    (r"^controlnet\.middle_block_out\.0\.", "controlnet.middle_out."),
    # VAE
    (r"\.nin_shortcut\.", ".shortcut."),
    (r"\.attn_1\.proj_out\.", ".attn_1.attention.out_proj."),
    # CLIP
    (r"^clip\.embeddings\.token_embedding\.weight$", "clip.token_embedding"),
    (r"^clip\.embeddings\.position_embedding\.weight$", "clip.position_embedding"),
    (r"^clip\.encoder\.layers\.", "clip.layers."),
    (r"\.self_attn\.out_proj\.", ".attention.out_proj."),
    (r"\.mlp\.fc", ".fc"),
]

# Query/key/value projections fused into one `in_proj`; the captured letter orders the parts.
FUSED = [
    (r"\.attn1\.to_([qkv])\.", ".self_attention.in_proj."),  # U-Net
    (r"\.attn_1\.([qkv])\.", ".attn_1.attention.in_proj."),  # VAE (1x1 convolutions)
    (r"\.self_attn\.([qkv])_proj\.", ".attention.in_proj."),  # CLIP
]

# Original tensors we have no use for: the training schedule (we compute ours), CLIP's
# position ids (always 0..76) and the EMA copy some training checkpoints carry.
IGNORED = re.compile(r"^(betas|alphas_cumprod.*|sqrt_.*|log_one_minus.*|posterior_.*|model_ema\..*|.*\.position_ids)$")

# Telltale key prefixes of the checkpoints people most often mistake for SD 1.x.
OTHER_MODELS = [
    ("cond_stage_model.model.", "a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder)"),
    ("conditioner.embedders.", "an SDXL checkpoint"),
    ("down_blocks.", "a diffusers-format U-Net (not a single-file checkpoint)"),
    ("text_model.", "a bare CLIP text encoder"),
]

SD15_HINT = "use an SD 1.x checkpoint such as v1-5-pruned-emaonly.safetensors"
# convert's refusal of a checkpoint whose tensors do not fit our models
CHECKPOINT_REFUSAL = "not an SD 1.x checkpoint: tensors {problems}; " + SD15_HINT


def target_name(key: str) -> tuple[str, int] | None:
    """Our parameter name for an original key, and the part it fills (0 unless fused); None to ignore it."""
    if IGNORED.match(key):
        return None
    for original, ours in PREFIXES:
        if key.startswith(original):
            name = ours + key[len(original):]
            break
    else:
        return key, 0  # not ours: reported as unexpected
    for pattern, replacement in RENAMES:
        name = re.sub(pattern, replacement, name)
    for pattern, replacement in FUSED:
        match = re.search(pattern, name)
        if match:
            return name[: match.start()] + replacement + name[match.end():], "qkv".index(match.group(1))
    return name, 0


def read_checkpoint(path: str | Path, hint: str = SD15_HINT) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors or a .ckpt (tensors only, never code), memory-mapped, read when used.
    `hint`: what the errors tell the user to give instead."""
    path = Path(path)
    if not path.is_file():
        raise SDError(f"checkpoint not found: {path}; {hint}")
    if path.suffix == ".safetensors":
        return MappedSafetensors(path)
    return _read_pickle(path, hint)


# safetensors dtype names -> torch (the small integer and bool types for LoRA files: LyCORIS IA3 stores a bool)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class MappedCheckpoint(dict):
    """name -> tensor view into a private memory map of a checkpoint file: nothing is read until used. `metadata`:
    the file's own strings (a .safetensors header's __metadata__), empty for a .ckpt."""

    metadata: dict[str, str] = {}


def release_pages(tensor: torch.Tensor) -> None:
    """Hands the pages of a tensor that lies in a private file mapping back to the kernel: our memory no longer
    holds them, and the next use reads them again from the file (from the page cache, if it kept them).
    Unmodified pages of a private file mapping are simply dropped, so this is safe for pages shared with
    other tensors of the file, and must never be used on ordinary memory, whose contents it would zero."""
    if _LIBC is None:
        return
    begin = tensor.data_ptr()
    start = begin - begin % mmap.PAGESIZE
    end = begin + tensor.numel() * tensor.element_size()
    _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


_LIBC = ctypes.CDLL(None) if hasattr(mmap, "MADV_DONTNEED") else None  # POSIX only


class MappedSafetensors(MappedCheckpoint):
    """A .safetensors file, read by our own small reader over a private memory map."""

    def __init__(self, path: Path):
        super().__init__()
        problem = f"cannot read {path} as safetensors: the file is truncated or not a checkpoint; download it again"
        with open(path, "rb") as file:
            try:
                self.memory = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
            except ValueError:  # an empty file
                raise SDError(problem) from None
        try:
            header_size = int.from_bytes(self.memory[:8], "little")
            header = json.loads(self.memory[8 : 8 + header_size])
            self.metadata = header.pop("__metadata__", None) or {}
            for name, entry in header.items():
                begin, end = (8 + header_size + offset for offset in entry["data_offsets"])
                if end > len(self.memory):
                    raise ValueError(f"{name} lies past the end of the file")
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                flat = torch.frombuffer(self.memory, dtype=dtype, count=math.prod(entry["shape"]), offset=begin)
                self[name] = flat.view(entry["shape"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise SDError(problem) from None


def _read_pickle(path: Path, hint: str) -> dict[str, torch.Tensor]:
    if not zipfile.is_zipfile(path):
        raise SDError(f"{path} is not a PyTorch checkpoint (no zip archive inside: truncated or another kind of file); download it again")
    try:
        # weights_only refuses anything but tensors and plain containers: a pickle cannot run code here.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        refuse_code(str(path), path, "a checkpoint", PICKLE_FIX)
        raise SDError(f"refusing {path}: it holds more than tensors, and a checkpoint must hold only tensors; {PICKLE_FIX}") from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise SDError(f"cannot read {path} ({_first_line(error)}): the file is truncated or damaged; download it again") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise SDError(f"{path} holds a {type(checkpoint).__name__}, not a dictionary of tensors; {hint}")
    # torch.load(mmap=True) maps the file privately (its default), so the tensors are file pages too
    return MappedCheckpoint((key, value) for key, value in checkpoint.items() if isinstance(value, torch.Tensor))


PICKLE_FIX = "use a .safetensors file from a trusted source"


def refuse_code(source, path: Path, what: str, fix: str, allowed: tuple[str, ...] = ()) -> None:
    """Raises an SDError naming the callables (globals) that the pickled file `source` (a path or a file object)
    holds beyond tensors and `allowed`: what weights_only refused. The pickle is read as data, never run."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception:  # not a readable PyTorch file at all: the caller says so
        return
    unsafe = [name for name in unsafe if name not in allowed]
    if unsafe:
        raise SDError(f"refusing {path}: it would call {', '.join(unsafe)}, and {what} must hold only tensors; {fix}")


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def convert(checkpoint: dict[str, torch.Tensor], expected: dict[str, torch.Size], dtype: torch.dtype, device="cpu",
            channels_last: bool = False, keep: tuple[str, ...] = (), target=target_name,
            refusal: str = CHECKPOINT_REFUSAL) -> dict[str, torch.Tensor]:
    """Renames original tensors to ours, fuses q/k/v, casts each to `dtype` on arrival, and with
    `channels_last` lays out convolution kernels as (C_out, kH, kW, C_in) in memory. Tensors whose new
    names start with a prefix in `keep` stay as the checkpoint has them (dtype, layout and memory-mapped
    pages), except fused ones, which become new tensors in `dtype`.

    Empties `checkpoint` as it goes, so that each original tensor can be freed once cast (a memory-mapped
    one's pages are handed back). `expected` maps each of our parameter names to its shape; `target` names a
    key's parameter as target_name does (the VAE files' own layouts have theirs, sd/files/vae_file.py). Raises
    SDError, `refusal` with its {problems} named: every missing, unexpected or misshapen tensor.
    """
    parts: dict[str, dict[int, torch.Tensor]] = {}
    unexpected, original_names = [], {}
    mapped = isinstance(checkpoint, MappedCheckpoint)
    while checkpoint:
        key, tensor = checkpoint.popitem()
        found = target(key)
        if found is None:
            continue
        name, part = found
        if name not in expected:
            unexpected.append(key)
            continue
        if name.startswith(keep):
            parts.setdefault(name, {})[part] = tensor
        else:
            layout = torch.channels_last if channels_last and len(expected[name]) == 4 else torch.preserve_format
            parts.setdefault(name, {})[part] = cast = tensor.to(device=device, dtype=dtype, memory_format=layout)
            if mapped and cast.data_ptr() != tensor.data_ptr():
                release_pages(tensor)
        original_names.setdefault(name, []).append(key)
    missing = [name for name in expected if name not in parts]
    _check_other_model(unexpected)
    state, wrong_shapes = {}, []
    for name, pieces in parts.items():
        tensor = _assemble(pieces, expected[name], dtype)
        if tensor is None:
            wrong_shapes.append(f"{'+'.join(original_names[name])} {[list(p.shape) for p in pieces.values()]} (expected {list(expected[name])})")
        else:
            state[name] = tensor
            if mapped and len(pieces) > 1 and name.startswith(keep):
                for piece in pieces.values():  # fused from the file's pages into a new tensor: read once, done with
                    release_pages(piece)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_some(unexpected)})")
    if wrong_shapes:
        problems.append(f"{len(wrong_shapes)} with the wrong shape ({_some(wrong_shapes)})")
    if problems:
        raise SDError(refusal.format(problems="; ".join(problems)))
    return state


def _assemble(pieces: dict[int, torch.Tensor], shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
    """Joins fused q/k/v parts (into `dtype`) and flattens 1x1 convolutions used as linear layers; None if
    the shape is wrong."""
    if sorted(pieces) not in ([0], [0, 1, 2]):
        return None
    ordered = [pieces[i] for i in sorted(pieces)]
    if len(shape) == 2:
        # (C_out, C_in, 1, 1) -> (C_out, C_in)
        ordered = [p.flatten(1) if p.dim() == 4 and p.shape[2:] == (1, 1) else p for p in ordered]
    if len(ordered) == 1:
        tensor = ordered[0]
    elif any(p.shape[1:] != ordered[0].shape[1:] for p in ordered):
        return None
    elif ordered[0].is_meta:  # a check of names and shapes (sd/files/loader.py): torch.cat there costs a 1.8 s import
        tensor = ordered[0].new_empty((sum(len(p) for p in ordered), *ordered[0].shape[1:]), dtype=dtype)
    else:
        tensor = torch.cat([p.to(dtype) for p in ordered])
    return tensor if tensor.shape == shape else None


def _check_other_model(unexpected: list[str]) -> None:
    for prefix, description in OTHER_MODELS:
        if any(key.startswith(prefix) for key in unexpected):
            raise SDError(f"this is {description}, not SD 1.x; {SD15_HINT}")


def _some(names: list[str], limit: int = 5) -> str:
    more = f", and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# The other direction, ours -> original, for writing checkpoints (the demo model): renames applied in order to
# our names, then our prefixes swapped for the original ones. U-Net residual blocks are told apart from the
# transformer blocks (which also have norm1 and norm2) by where they sit: block j of stage i, directly.
RESIDUAL_BLOCK = r"^(diffusion\.(?:input_blocks\.\d+|middle_block|output_blocks\.\d+)\.\d+)\."
ORIGINAL_RENAMES = [
    (r"^diffusion\.time_embedding\.linear_1\.", "diffusion.time_embed.0."),
    (r"^diffusion\.time_embedding\.linear_2\.", "diffusion.time_embed.2."),
    (r"^diffusion\.norm_out\.", "diffusion.out.0."),
    (r"^diffusion\.conv_out\.", "diffusion.out.2."),
    *((RESIDUAL_BLOCK + ours + r"\.", rf"\1.{original}.") for ours, original in [
        ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_proj", "emb_layers.1"),
        ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("shortcut", "skip_connection")]),
    (r"^(diffusion\.input_blocks\.\d+\.0)\.conv\.", r"\1.op."),
    (r"\.self_attention\.out_proj\.", ".attn1.to_out.0."),
    (r"\.cross_attention\.out_proj\.", ".attn2.to_out.0."),
    (r"\.cross_attention\.([qkv])_proj\.", r".attn2.to_\1."),
    (r"\.feed_forward\.proj_in\.", ".ff.net.0.proj."),
    (r"\.feed_forward\.proj_out\.", ".ff.net.2."),
    (r"^((?:encoder|decoder)\..*)\.shortcut\.", r"\1.nin_shortcut."),
    (r"\.attn_1\.attention\.out_proj\.", ".attn_1.proj_out."),
    (r"^clip\.token_embedding$", "clip.embeddings.token_embedding.weight"),
    (r"^clip\.position_embedding$", "clip.embeddings.position_embedding.weight"),
    (r"^clip\.layers\.", "clip.encoder.layers."),
    (r"^(clip\..*)\.attention\.out_proj\.", r"\1.self_attn.out_proj."),
    (r"\.fc([12])\.", r".mlp.fc\1."),
]
# Our fused projections -> the original q, k and v names ("{}" is the letter).
ORIGINAL_FUSED = [
    (r"\.self_attention\.in_proj\.", ".attn1.to_{}."),
    (r"\.attn_1\.attention\.in_proj\.", ".attn_1.{}."),
    (r"\.attention\.in_proj\.", ".self_attn.{}_proj."),
]
ORIGINAL_PREFIXES = [(ours, original) for original, ours in PREFIXES[:6]]
# The VAE's attention projections are 1x1 convolutions in the original.
ORIGINAL_CONVOLUTIONS = re.compile(r"^first_stage_model\.(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def original_name(name: str) -> str:
    for pattern, replacement in ORIGINAL_RENAMES:
        name = re.sub(pattern, replacement, name)
    ours, original = next(pair for pair in sorted(ORIGINAL_PREFIXES, key=lambda pair: -len(pair[0])) if name.startswith(pair[0]))
    return original + name[len(ours):]


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state (names such as "diffusion.input_blocks.1.0.norm1.weight") under the original CompVis names, with
    fused projections split into q, k and v; each name checked to read back through `target_name`."""
    original = {}
    for name, tensor in state.items():
        fused = next(((pattern, template) for pattern, template in ORIGINAL_FUSED if re.search(pattern, name)), None)
        parts = [(name, tensor)] if fused is None else [
            (re.sub(fused[0], fused[1].format(letter), name), piece) for letter, piece in zip("qkv", tensor.chunk(3))]
        for part, (renamed, piece) in enumerate(parts):
            key = original_name(renamed)
            if target_name(key) != (name, part):
                raise ValueError(f"{name} would be written as {key}, which reads back as {target_name(key)}")
            original[key] = piece[:, :, None, None] if ORIGINAL_CONVOLUTIONS.match(key) else piece
    return original


def write_original_checkpoint(state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype, metadata: dict[str, str]) -> None:
    """Writes our state as an original-layout .safetensors in `dtype` (with CLIP's position ids, as the original
    has them), atomically."""
    from safetensors.torch import save_file

    tensors = {key: value.detach().to(dtype).contiguous() for key, value in to_original(state).items()}
    positions = len(state["clip.position_embedding"])
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    temporary.replace(path)
