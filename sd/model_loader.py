"""Builds our four models without initialising them and fills them straight from a checkpoint."""

import json
from pathlib import Path

import torch
from torch import nn

from .clip import CLIP, CLIPConfig
from .decoder import Decoder
from .diffusion import UNet, UNetConfig
from .encoder import Encoder
from .errors import SDError
from .layers import pack_weights, packing_pays
from .model_converter import convert, read_checkpoint, release_pages
from .vae import VAEConfig

LATENT_FACTOR = 8  # the VAE shrinks each side 8 times
UNET_FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"
# Models that keep the checkpoint's own tensors on a CPU (see load_models).
MAPPED_MODELS = ("clip.", "encoder.")
# Models whose weights are packed for oneDNN (see load_models).
PACKED_MODELS = ("diffusion", "decoder")


def load_models(checkpoint: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    """Returns {"clip", "encoder", "decoder", "diffusion"}, every weight loaded strictly, in eval mode.

    The U-Net and the decoder hold their weights in `dtype`. On a CPU the text encoder and the VAE encoder,
    which run once per prompt or image, keep the checkpoint's memory-mapped tensors as they are (cast on
    use, sd/layers.py): their `mapped_parameters` can be handed back to the file after each use
    (`release_mapped`), so that they take no memory while the U-Net and the decoder run. In bf16 on a CPU
    with bf16 instructions, the U-Net's and the decoder's weights are packed in oneDNN's layouts
    (sd/layers.py, pack_weights).
    """
    tensors = read_checkpoint(checkpoint)
    unet_config, vae_config, clip_config = model_configs(tensors, checkpoint)
    # On the meta device a model has shapes but no memory and no random initialisation.
    with torch.device("meta"):
        models = {"clip": CLIP(clip_config), "encoder": Encoder(vae_config), "decoder": Decoder(vae_config), "diffusion": UNet(unet_config)}
    expected = {f"{name}.{key}": value.shape for name, model in models.items() for key, value in model.state_dict().items()}
    device = torch.device(device)
    kind = device.type
    packed = PACKED_MODELS if packing_pays(device, dtype) else ()
    file_pages = {tensor.data_ptr() for tensor in tensors.values()} if kind == "cpu" else set()
    # channels_last convolutions are 10-20 % faster on CPU (oneDNN) and on CUDA; MPS gains nothing
    state = convert(tensors, expected, dtype, device, channels_last=kind != "mps", keep=MAPPED_MODELS if kind == "cpu" else ())
    for name, model in models.items():
        prefix = name + "."
        own = {key[len(prefix):]: state.pop(key) for key in list(state) if key.startswith(prefix)}
        # assign=True adopts our tensors as the parameters instead of copying into the meta ones.
        model.load_state_dict(own, strict=True, assign=True)
        del own  # so that each plain weight is freed as soon as its packed copy replaces it
        model.eval().requires_grad_(False)
        if prefix in MAPPED_MODELS:
            model.mapped_parameters = [p for p in model.parameters() if p.data_ptr() in file_pages]
        if name in packed:
            pack_weights(model)
    return models


def release_mapped(model: nn.Module) -> None:
    """Drops the model's memory-mapped weights from memory; they are read again from the file when next used."""
    for parameter in getattr(model, "mapped_parameters", ()):
        release_pages(parameter)


def image_size(checkpoint: str | Path) -> int:
    """The side of the images the checkpoint's U-Net was trained on (512 for SD 1.5), read from its header alone."""
    unet_config, _, _ = model_configs(read_checkpoint(checkpoint), checkpoint)
    return unet_config.sample_size * LATENT_FACTOR


def model_configs(tensors: dict[str, torch.Tensor], path) -> tuple[UNetConfig, VAEConfig, CLIPConfig]:
    """The models' sizes: SD 1.5's, unless the file's metadata gives others under "sd_config" (as the demo
    model's does: {"unet": {...}, "vae": {...}, "clip": {...}}, each the fields of our config)."""
    described = getattr(tensors, "metadata", {}).get("sd_config")
    if described is None:
        return UNetConfig(in_channels=_unet_in_channels(tensors)), VAEConfig(), CLIPConfig()
    try:
        sizes = json.loads(described)
        return tuple(_config(kind, sizes[name]) for kind, name in ((UNetConfig, "unet"), (VAEConfig, "vae"), (CLIPConfig, "clip")))
    except (ValueError, KeyError, TypeError) as error:
        raise SDError(f"the sd_config metadata of {path} is not valid ({error}): remove it, or write the file again with sd's training") from None


def _config(kind: type, values: dict):
    """A config dataclass from its JSON fields (lists become the tuples the dataclasses hold)."""
    return kind(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})


def _unet_in_channels(tensors: dict[str, torch.Tensor]) -> int:
    first_conv = tensors.get(UNET_FIRST_CONV)
    return first_conv.shape[1] if first_conv is not None and first_conv.dim() == 4 else UNetConfig.in_channels

