"""Builds our four models without initialising them and fills them straight from a checkpoint."""

import json
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..models.clip import CLIP, CLIPConfig
from ..models.controlnet import ControlNet
from ..models.decoder import Decoder
from ..models.unet import UNet, UNetConfig
from ..models.encoder import Encoder
from ..errors import SDError
from ..kernels import choice
from ..models.layers import fold_upsampling, pack_weights, packing_pays, packs_per_size
from ..precision import compute_dtype
from .converter import CHECKPOINT_REFUSAL, MappedCheckpoint, convert, read_checkpoint, release_pages, target_name
from ..models.vae import VAEConfig
from .vae_file import VAE_PREFIX, read_vae_file, vae_refusal, vae_target

LATENT_FACTOR = 8  # the VAE shrinks each side 8 times
UNET_FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"
# Models that keep the checkpoint's own tensors on a CPU (see load_models).
MAPPED_MODELS = ("clip.", "encoder.")
# Models whose weights are packed for oneDNN (see load_models).
PACKED_MODELS = ("diffusion", "decoder", "controlnet")
VAE_MODELS = ("encoder", "decoder")


def load_models(checkpoint: str | Path, device="cpu", dtype: torch.dtype = torch.float32, vae: str | Path | None = None) -> dict[str, nn.Module]:
    """Returns {"clip", "encoder", "decoder", "diffusion"}, every weight loaded strictly, in eval mode. With `vae`,
    a VAE file (sd/files/vae_file.py) stands in for the checkpoint's VAE, which is then never read (nor needed).

    The U-Net and the decoder hold their weights in `dtype`. On a CPU the text encoder and the VAE encoder,
    which run once per prompt or image, keep the checkpoint's memory-mapped tensors as they are (cast on
    use, sd/models/layers.py): their `mapped_parameters` can be handed back to the file after each use
    (`release_mapped`), so that they take no memory while the U-Net and the decoder run. Where it pays on the
    CPU (sd/kernels.py), the U-Net's and the decoder's weights are packed in oneDNN's layouts
    (sd/models/layers.py, pack_weights); where not, and they compute in `dtype`, their upsampling layers'
    kernels are folded once (Upsample.fold).
    """
    tensors = read_checkpoint(checkpoint)
    unet_config, vae_config, clip_config = model_configs(tensors, checkpoint)
    # On the meta device a model has shapes but no memory and no random initialisation.
    with torch.device("meta"):
        models = {"clip": CLIP(clip_config), "encoder": Encoder(vae_config), "decoder": Decoder(vae_config), "diffusion": UNet(unet_config)}
    device = torch.device(device)
    if vae is not None:
        load_vae_file(models, vae, device, dtype)  # first: a wrong file fails before the checkpoint is read
        for key in [key for key in tensors if key.startswith(VAE_PREFIX)]:
            del tensors[key]
    fill({name: model for name, model in models.items() if vae is None or name not in VAE_MODELS}, tensors, device, dtype)
    return models


def swap_vae(models: dict[str, nn.Module], vae: str | Path) -> None:
    """Replaces the encoder and the decoder of loaded `models` with those of a VAE file (sd/files/vae_file.py), on the
    decoder's device, in the U-Net's dtype. The file is checked before the old VAE is let go, so that a wrong
    file leaves the models as they were and the two VAEs are never in memory together."""
    config = models["decoder"].config
    check_vae_file(vae, config)
    device, dtype = next(models["decoder"].parameters()).device, next(models["diffusion"].parameters()).dtype
    with torch.device("meta"):  # the old VAE is let go here
        models["encoder"], models["decoder"] = Encoder(config), Decoder(config)
    load_vae_file(models, vae, device, dtype)


def check_vae(vae: str | Path, checkpoint: str | Path) -> None:
    """Refuses (SDError naming the file and its problem) a VAE file that cannot stand in for the checkpoint's
    VAE, from the names and shapes in the two files, reading no weights."""
    _, config, _ = model_configs(read_checkpoint(checkpoint), checkpoint)
    check_vae_file(vae, config)


def check_vae_file(vae: str | Path, config: VAEConfig) -> None:
    with torch.device("meta"):
        models = {"encoder": Encoder(config), "decoder": Decoder(config)}
    load_vae_file(models, vae, torch.device("meta"), torch.float32)  # on the meta device nothing is read


def load_vae_file(models: dict[str, nn.Module], vae: str | Path, device: torch.device, dtype: torch.dtype) -> None:
    """Fills the encoder and the decoder of `models` (on the meta device) from a VAE file."""
    target = partial(vae_target, levels=len(models["decoder"].up))
    fill({name: models[name] for name in VAE_MODELS}, read_vae_file(vae), device, dtype, target, vae_refusal(vae))


def fill(models: dict[str, nn.Module], tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
         target=target_name, refusal: str = CHECKPOINT_REFUSAL) -> None:
    """Loads `tensors` (original names, as `target` reads them; see model_converter.convert) into `models`, built on
    the meta device, each weight strictly, as load_models describes."""
    expected = {f"{name}.{key}": value.shape for name, model in models.items() for key, value in model.state_dict().items()}
    kind = device.type
    packed = tuple(f"{name}." for name in PACKED_MODELS) if packing_pays(device, dtype) else ()
    file_pages = {tensor.data_ptr() for tensor in tensors.values()} if kind == "cpu" else set()
    channels_last = loads_channels_last(device, dtype)
    # models to be packed keep the file's tensors too: pack_weights casts each in a scratch buffer, not a new copy
    state = convert(tensors, expected, dtype, device, channels_last=channels_last, keep=MAPPED_MODELS + packed if kind == "cpu" else (),
                    target=target, refusal=refusal)

    def done(tensor: torch.Tensor) -> None:
        if tensor.data_ptr() in file_pages:
            release_pages(tensor)

    for name, model in models.items():
        prefix = name + "."
        own = {key[len(prefix):]: state.pop(key) for key in list(state) if key.startswith(prefix)}
        # assign=True adopts our tensors as the parameters instead of copying into the meta ones.
        model.load_state_dict(own, strict=True, assign=True)
        del own  # so that each plain weight is freed as soon as its packed copy replaces it
        model.eval().requires_grad_(False)
        if prefix in MAPPED_MODELS:
            model.mapped_parameters = [p for p in model.parameters() if p.data_ptr() in file_pages]
        if prefix in packed:
            pack_weights(model, dtype, channels_last, done, per_size=packs_per_size(device, dtype))
        elif kind == "cpu" and compute_dtype(dtype, device) == dtype:  # else folded on each call, in the dtype computed in
            fold_upsampling(model, channels_last, done)


def loads_channels_last(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether convolution kernels stored in `dtype` are laid out channels_last at load: where convolutions in
    the dtype they compute in are faster so (sd/kernels.py), as the layers would cast them on each call."""
    return choice("channels_last", device, compute_dtype(dtype, device)) == "on"


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



CONTROLNET_PREFIX = "control_model."
CONTROLNET_HINT = "use an SD 1.5 ControlNet in its original single-file layout, such as control_v11p_sd15_canny.pth or .safetensors"
# Telltale keys of the files most often mistaken for an SD 1.5 ControlNet, first match wins.
OTHER_CONTROL_FILES = [
    ("controlnet_cond_embedding.conv_in.weight", "a ControlNet in diffusers' layout (diffusion_pytorch_model.safetensors)"),
    ("lora_controlnet", "a Control-LoRA, which sd does not run"),
    ("adapter.", "a T2I-Adapter, which sd does not run"),
    ("body.0.", "a T2I-Adapter, which sd does not run"),
    ("model.diffusion_model.", "a Stable Diffusion checkpoint, not a ControlNet: give it as the checkpoint"),
]
# The width of the text context a ControlNet's cross-attention reads tells the base model it was made for.
CONTEXT_KEY = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CONTEXT_MODELS = {1024: "an SD 2.x ControlNet (1024-wide OpenCLIP text context)", 2048: "an SDXL ControlNet"}


def load_controlnet(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> ControlNet:
    """An SD 1.5 ControlNet from its original file (.pth, .ckpt or .safetensors; tensors under `control_model.`,
    as in the full ControlLDM checkpoints, or bare), every weight loaded strictly, in eval mode, in `dtype`, packed
    for oneDNN where the U-Net would be (sd/models/layers.py, pack_weights)."""
    tensors = read_controlnet(path)
    config = controlnet_config(tensors, path)
    with torch.device("meta"):
        controlnet = ControlNet(config, hint_channels=tensors[CONTROLNET_PREFIX + "input_hint_block.0.weight"].shape[1])
    fill({"controlnet": controlnet}, tensors, torch.device(device), dtype, refusal="not an SD 1.5 ControlNet: tensors {problems}; " + CONTROLNET_HINT)
    return controlnet


def read_controlnet(path: str | Path) -> MappedCheckpoint:
    """The ControlNet's tensors of a file, memory-mapped (see controlnet_tensors); cheap enough to check a file
    before anything loads."""
    if not Path(path).is_file():
        raise SDError(f"ControlNet not found: {path}; {CONTROLNET_HINT}")
    return controlnet_tensors(read_checkpoint(path), path)


def controlnet_tensors(tensors: MappedCheckpoint, path) -> MappedCheckpoint:
    """The ControlNet's tensors of a file, all under `control_model.` (a bare file's given that prefix); SDError
    naming what the file looks like when it is no SD 1.5 ControlNet. Reads the names and shapes alone."""
    if not any(key.startswith(CONTROLNET_PREFIX) for key in tensors) and "input_hint_block.0.weight" in tensors:
        control = MappedCheckpoint((CONTROLNET_PREFIX + key, value) for key, value in tensors.items())
    else:
        control = MappedCheckpoint((key, value) for key, value in tensors.items() if key.startswith(CONTROLNET_PREFIX))
    control.metadata = tensors.metadata
    if CONTROLNET_PREFIX + "input_hint_block.0.weight" not in control:
        what = next((description for key, description in OTHER_CONTROL_FILES if any(name.startswith(key) for name in tensors)), None)
        raise SDError(f"{path} is {what or 'not a ControlNet (it has no input_hint_block)'}; {CONTROLNET_HINT}")
    context = control.get(CONTROLNET_PREFIX + CONTEXT_KEY)
    if context is not None and context.shape[-1] in CONTEXT_MODELS:
        raise SDError(f"{path} is {CONTEXT_MODELS[context.shape[-1]]}, not one for SD 1.5; {CONTROLNET_HINT}")
    if CONTROLNET_PREFIX + "label_emb.0.0.weight" in control:
        raise SDError(f"{path} is {CONTEXT_MODELS[2048]}, not one for SD 1.5; {CONTROLNET_HINT}")
    return control


def controlnet_config(tensors: MappedCheckpoint, path) -> UNetConfig:
    """The sizes of the ControlNet's encoder: SD 1.5's, unless the file's metadata gives others under
    "sd_config" as {"controlnet": {...}} (as the tests' small ControlNets do)."""
    described = tensors.metadata.get("sd_config")
    if described is None:
        return UNetConfig()
    try:
        return _config(UNetConfig, json.loads(described)["controlnet"])
    except (ValueError, KeyError, TypeError) as error:
        raise SDError(f"the sd_config metadata of {path} is not valid ({error}): remove it") from None
