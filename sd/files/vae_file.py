"""VAE files that replace a checkpoint's VAE (`--vae`), in the three layouts found in the wild:

- the original's names, bare (`encoder.conv_in.weight`, `quant_conv.weight`, ...): vae-ft-mse-840000-ema-pruned,
  whose .ckpt wraps them in `state_dict` beside the training's `loss.*` and `model_ema.*` entries;
- the same names under `first_stage_model.`, as a checkpoint holds them (or under `vae.`);
- diffusers' names (`encoder.down_blocks.0.resnets.0.conv1.weight`, `decoder.up_blocks...`, attention as
  `to_q` or the older `query`), whose decoder levels are counted from the lowest resolution.

Each name is turned into the original's by the rules below, then into ours by the checkpoint's converter
(sd/files/converter.py). sd/files/loader.py loads the files (load_models(vae=...), swap_vae, check_vae).
"""

import re
from pathlib import Path

import torch

from ..errors import SDError
from .converter import OTHER_MODELS, read_checkpoint, target_name

VAE_HINT = "use an SD 1.x VAE such as vae-ft-mse-840000-ema-pruned.safetensors, or leave out --vae"
VAE_PREFIX = "first_stage_model."  # the VAE's tensors in a checkpoint
FILE_PREFIXES = (VAE_PREFIX, "vae.")  # what a VAE file may put before its names (diffusers strips either)
VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
DROPPED = ("loss.", "model_ema.")  # the training's discriminator and EMA bookkeeping, as A1111 drops them
WHOLE_CHECKPOINT = ("model.diffusion_model.", "cond_stage_model.", "conditioner.")

# diffusers' attention names (new and old) -> the original's
ATTENTION = {"to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v", "value": "v", "to_out.0": "proj_out", "proj_attn": "proj_out"}
# diffusers' names -> the original's, applied in order; the decoder's levels are renumbered apart (original_name)
DIFFUSERS_RENAMES = [
    (r"\.down_blocks\.(\d+)\.resnets\.", r".down.\1.block."),
    (r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample."),
    (r"\.mid_block\.resnets\.(\d+)\.", lambda match: f".mid.block_{int(match[1]) + 1}."),
    (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
    (r"\.attn_1\.group_norm\.", ".attn_1.norm."),
    (r"\.attn_1\.(" + "|".join(map(re.escape, ATTENTION)) + r")\.", lambda match: f".attn_1.{ATTENTION[match[1]]}."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
]
UP_BLOCK = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.")


def read_vae_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a VAE file (.safetensors, .ckpt or .pt; read without running code), memory-mapped; an
    SDError naming the file when it is no VAE file: a whole checkpoint, or no VAE tensors at all."""
    path = Path(path)
    if not path.is_file():
        raise SDError(f"VAE file not found: {path}; {VAE_HINT}")
    try:
        tensors = read_checkpoint(path, hint=VAE_HINT)
    except SDError as error:  # the file named, not yet what it was meant for
        raise SDError(f"VAE file: {error}") from None
    if any(key.startswith(WHOLE_CHECKPOINT) for key in tensors):
        kind = next((kind for prefix, kind in OTHER_MODELS if any(key.startswith(prefix) for key in tensors)), "a whole checkpoint")
        raise SDError(f"VAE file {path} is {kind}, not a VAE alone: give a checkpoint as --checkpoint; {VAE_HINT}")
    if not any(unprefixed(key).startswith(VAE_PARTS) for key in tensors):
        names = sorted(tensors)
        held = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "") if names else "no tensors"
        raise SDError(f"VAE file {path} holds no VAE tensors (it holds {held}); {VAE_HINT}")
    return tensors


def unprefixed(key: str) -> str:
    return next((key[len(prefix):] for prefix in FILE_PREFIXES if key.startswith(prefix)), key)


def original_name(key: str, levels: int) -> str:
    """The original checkpoint's name (under first_stage_model.) for a VAE file's key in any of the layouts; a
    VAE of `levels` resolutions (4 for SD 1.x)."""
    name = unprefixed(key)
    # diffusers counts the decoder's levels from the lowest resolution, the original from the highest
    name = UP_BLOCK.sub(lambda match: f"decoder.up.{levels - 1 - int(match[1])}.{'block' if match[2] == 'resnets' else 'upsample'}.", name)
    for pattern, replacement in DIFFUSERS_RENAMES:
        name = re.sub(pattern, replacement, name)
    return VAE_PREFIX + name


def vae_target(key: str, levels: int) -> tuple[str, int] | None:
    """Our parameter name for a VAE file's key and the part it fills (as target_name); None to leave it out."""
    if key.startswith(DROPPED):
        return None
    return target_name(original_name(key, levels))


def vae_refusal(path: str | Path) -> str:
    """model_converter.convert's refusal of a VAE file whose tensors do not fit the model's VAE."""
    return f"VAE file {path} does not fit this model's VAE: tensors {{problems}}; {VAE_HINT}"
