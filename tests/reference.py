"""The reference implementations, built offline from one of our random original-format checkpoints.

The U-Net and the VAE come from diffusers' own single-file converters, the text encoder is
transformers' CLIPTextModel under the checkpoint's own names. Each is built on the meta device
and takes the checkpoint's tensors as they are, so no random initialisation runs.
Attention runs in its plain (non-fused) form, so the comparison also checks our use of
`scaled_dot_product_attention`.
"""

from pathlib import Path

import torch
import yaml
from safetensors import safe_open

ORIGINAL_CONFIG = Path(__file__).parent / "fixtures" / "v1-inference.yaml"
DATA = Path(__file__).resolve().parent.parent / "data"
CLIP_PREFIX = "cond_stage_model.transformer.text_model."


def read_original(path, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors whose names start with `prefix`, under their original names."""
    if Path(path).suffix == ".ckpt":
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
        return {key: value for key, value in state.items() if key.startswith(prefix)}
    with safe_open(str(path), framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys() if key.startswith(prefix)}


def original_config() -> dict:
    return yaml.safe_load(ORIGINAL_CONFIG.read_text())


def _build_on_meta(model_class, config: dict, state: dict[str, torch.Tensor]):
    with torch.device("meta"):
        model = model_class(**config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def reference_unet(path, plain_attention: bool = True):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    from diffusers.models.attention_processor import AttnProcessor

    checkpoint = read_original(path, "model.diffusion_model.")
    config = create_unet_diffusers_config_from_ldm(original_config(), checkpoint)
    # the YAML says 4; an inpainting checkpoint's first convolution takes 9
    config["in_channels"] = checkpoint["model.diffusion_model.input_blocks.0.0.weight"].shape[1]
    unet = _build_on_meta(UNet2DConditionModel, config, convert_ldm_unet_checkpoint(checkpoint, config))
    if plain_attention:
        unet.set_attn_processor(AttnProcessor())
    return unet


def reference_vae(path, plain_attention: bool = True):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm
    from diffusers.models.attention_processor import AttnProcessor

    checkpoint = read_original(path, "first_stage_model.")
    config = create_vae_diffusers_config_from_ldm(original_config(), checkpoint)
    vae = _build_on_meta(AutoencoderKL, config, convert_ldm_vae_checkpoint(checkpoint, config))
    if plain_attention:
        vae.set_attn_processor(AttnProcessor())
    return vae


def reference_vae_file(path, plain_attention: bool = True):
    """diffusers' AutoencoderKL from a VAE file alone: the original's names (bare or under first_stage_model.)
    through its single-file converter, its own names (old attention names too) as its model loading reads them."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm
    from diffusers.models.attention_processor import AttnProcessor

    checkpoint = read_original(path, "")
    config = create_vae_diffusers_config_from_ldm(original_config(), checkpoint)
    if any(".down_blocks." in key for key in checkpoint):  # diffusers' layout
        with torch.device("meta"):
            state = AutoencoderKL(**config)._fix_state_dict_keys_on_load(dict(checkpoint))  # query -> to_q, ...
    else:
        state = convert_ldm_vae_checkpoint(checkpoint, config)
    vae = _build_on_meta(AutoencoderKL, config, state)
    if plain_attention:
        vae.set_attn_processor(AttnProcessor())
    return vae


def reference_clip(path, plain_attention: bool = True):
    from transformers import CLIPTextConfig, CLIPTextModel

    # transformers 5 names CLIPTextModel's tensors without the "text_model." level.
    original = read_original(path, CLIP_PREFIX)
    state = {key[len(CLIP_PREFIX):]: value for key, value in original.items() if not key.endswith("position_ids")}
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    )
    config._attn_implementation = "eager" if plain_attention else "sdpa"
    with torch.device("meta"):
        clip = CLIPTextModel(config)
    missing, unexpected = clip.load_state_dict(state, strict=False, assign=True)
    # position_ids is a buffer transformers builds itself, not a weight.
    assert not unexpected and all(key.endswith("position_ids") for key in missing), (missing, unexpected)
    clip.embeddings.position_ids = torch.arange(config.max_position_embeddings)[None]
    assert clip.config._attn_implementation == config._attn_implementation
    return clip.eval().requires_grad_(False)


def reference_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(DATA / "vocab.json"), str(DATA / "merges.txt"), model_max_length=77)


def reference_pipeline(path, scheduler, plain_attention: bool = True):
    """diffusers' StableDiffusionPipeline on the checkpoint's weights, with `scheduler`.

    `plain_attention=False` keeps diffusers' default (fused) attention, for benchmarks.
    """
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=reference_vae(path, plain_attention), text_encoder=reference_clip(path, plain_attention), tokenizer=reference_tokenizer(),
        unet=reference_unet(path, plain_attention), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def a1111_emphasis(z: torch.Tensor, weights: list[float], emphasis: str) -> torch.Tensor:
    """A1111's emphasis on one chunk's output z (1, 77, 768): each token's vector times its weight and, for
    "original", the chunk times (its mean before / its mean after); in fp64, so the means are exact."""
    if emphasis not in ("original", "no-norm"):
        return z
    z = z.double()
    weighted = z * torch.tensor(weights, dtype=torch.float64)[None, :, None]
    return (weighted * (z.mean() / weighted.mean()) if emphasis == "original" else weighted).float()


def a1111_conditioning(clip, chunks: list, clip_skip: int = 1, emphasis: str = "original") -> torch.Tensor:
    """A1111's conditioning (1, 77k, 768) of a prompt's chunks [(ids, weights)] from transformers' CLIPTextModel:
    hidden_states[-clip_skip] through the final layer norm, emphasis applied, the chunks one after another."""
    encoded = []
    with torch.no_grad():
        for ids, weights in chunks:
            output = clip(input_ids=torch.tensor([ids]), output_hidden_states=True)
            z = output.last_hidden_state if clip_skip == 1 else clip.final_layer_norm(output.hidden_states[-clip_skip])
            encoded.append(a1111_emphasis(z, weights, emphasis))
    return torch.cat(encoded, dim=1)


def reference_controlnet(path, original_config: dict, plain_attention: bool = True):
    """diffusers' ControlNetModel from an original-layout ControlNet file, through its single-file converter and
    config. diffusers 0.42.1's create_controlnet_diffusers_config_from_ldm calls create_unet_diffusers_config_from_ldm
    without the checkpoint it requires (a TypeError): it is handed one."""
    from unittest import mock

    from diffusers import ControlNetModel
    from diffusers.loaders import single_file_utils as utils
    from diffusers.models.attention_processor import AttnProcessor

    checkpoint = read_original(path, "")
    unet_config = utils.create_unet_diffusers_config_from_ldm
    with mock.patch.object(utils, "create_unet_diffusers_config_from_ldm", lambda config, image_size=None, **kwargs: unet_config(config, checkpoint, **kwargs)):
        config = utils.create_controlnet_diffusers_config_from_ldm(original_config, checkpoint)
    state = {key: value.float() for key, value in utils.convert_controlnet_checkpoint(checkpoint, config).items()}
    controlnet = _build_on_meta(ControlNetModel, config, state)
    if plain_attention:
        controlnet.set_attn_processor(AttnProcessor())
    return controlnet
