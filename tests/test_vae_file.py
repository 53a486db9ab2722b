"""VAE files in place of the checkpoint's VAE (sd/files/vae_file.py, `--vae`): each layout gives diffusers' numbers, the
image's settings name the file as A1111 does, and a file that cannot serve is one line, exit 2, before sampling.

The checkpoint ("host") is the demo model's U-Net and text encoder with SD 1.5's full-size VAE (random, seed 0), so
that SD 1.5 VAE files fit it while a render takes a second; the VAE files are another random VAE (seed 1) in each
layout. Nothing here loads the 4.3 GB checkpoint.

Tolerance of the comparisons with diffusers: max |ours - diffusers| <= 1e-4 * max |diffusers|, fp32, as in
tests/test_parity.py for the checkpoint's own VAE (differently ordered sums through some 40 layers; a swapped
projection or a level in the wrong place gives errors of order 1e-2 to 1).
"""

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from checkpoints import random_sd15_state_dict, unpacked_state_dict
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cli
from sd import SDError, Settings, generate, load_models
from sd.files import hashes
from sd.files.loader import swap_vae
from sd.pipeline import DEMO_CHECKPOINT
from sd.settings import read_infotext
from sd.files.vae_file import original_name, vae_target
from sd.models.vae import VAEConfig
from test_parity import RELATIVE_TOLERANCE, assert_close

PREFIX = "first_stage_model."


def bare(state: dict) -> dict:
    return {key.removeprefix(PREFIX): value for key, value in state.items()}


def diffusers_layout(state: dict, old_attention: bool = False) -> dict:
    """The VAE under diffusers' names, by diffusers' own converter; with `old_attention`, its old attention names."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm
    from reference import original_config

    converted = convert_ldm_vae_checkpoint(state, create_vae_diffusers_config_from_ldm(original_config(), state))
    if not old_attention:
        return converted
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in converted.items():
        for new, older in old.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{older}.")
        renamed[key] = value
    return renamed


def training_extras() -> dict:
    """What the training leaves in a VAE .ckpt beside the weights: the discriminator's loss and the EMA's counters."""
    return {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4),
            "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(840000)}


# file name -> how it is written from the original state (first_stage_model. names)
LAYOUTS = {
    "bare.ckpt": lambda state, path: torch.save({"state_dict": {**bare(state), **training_extras()}, "global_step": 840000}, path),
    "prefixed.safetensors": lambda state, path: save_file(state, path),
    "diffusers.safetensors": lambda state, path: save_file(diffusers_layout(state), path),
    "diffusers-old.safetensors": lambda state, path: save_file(diffusers_layout(state, old_attention=True), path),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The host checkpoint ("host"), the same without its VAE ("no-vae"), and the seed-1 VAE in each layout."""
    folder = tmp_path_factory.mktemp("vae")
    demo = load_file(DEMO_CHECKPOINT)
    with safe_open(str(DEMO_CHECKPOINT), "pt") as demo_file:
        sizes = json.loads(demo_file.metadata()["sd_config"])
    sizes["vae"] = dataclasses.asdict(VAEConfig())  # SD 1.5's
    metadata = {"sd_config": json.dumps(sizes)}
    rest = {key: value for key, value in demo.items() if not key.startswith(PREFIX)}
    paths = {"host": folder / "host.safetensors", "no-vae": folder / "no-vae.safetensors"}
    save_file({**rest, **random_sd15_state_dict(seed=0, prefix=PREFIX)}, paths["host"], metadata=metadata)
    save_file(rest, paths["no-vae"], metadata=metadata)
    other = random_sd15_state_dict(seed=1, prefix=PREFIX)
    for name, write in LAYOUTS.items():
        paths[name] = folder / name
        write(other, paths[name])
    return paths


def vae_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents to decode, an image to encode and the encoder's noise."""
    generator = torch.Generator().manual_seed(3)
    return torch.randn(1, 4, 8, 8, generator=generator), torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1, torch.randn(1, 4, 8, 8, generator=generator)


def decode_and_encode(models: dict) -> tuple[torch.Tensor, torch.Tensor]:
    latents, image, noise = vae_inputs()
    with torch.inference_mode():
        return models["decoder"](latents), models["encoder"](image, noise)


NAMES = {  # a VAE file's name -> the original's, as sd/files/vae_file.py reads it (4 levels, as SD 1.5's)
    "encoder.conv_in.weight": "first_stage_model.encoder.conv_in.weight",
    "first_stage_model.quant_conv.bias": "first_stage_model.quant_conv.bias",
    "vae.post_quant_conv.weight": "first_stage_model.post_quant_conv.weight",
    "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
    "encoder.down_blocks.2.downsamplers.0.conv.bias": "first_stage_model.encoder.down.2.downsample.conv.bias",
    "decoder.up_blocks.0.resnets.2.norm1.weight": "first_stage_model.decoder.up.3.block.2.norm1.weight",
    "decoder.up_blocks.2.upsamplers.0.conv.weight": "first_stage_model.decoder.up.1.upsample.conv.weight",
    "decoder.mid_block.resnets.1.conv2.weight": "first_stage_model.decoder.mid.block_2.conv2.weight",
    "encoder.mid_block.attentions.0.group_norm.bias": "first_stage_model.encoder.mid.attn_1.norm.bias",
    "encoder.mid_block.attentions.0.to_out.0.weight": "first_stage_model.encoder.mid.attn_1.proj_out.weight",
    "decoder.mid_block.attentions.0.value.bias": "first_stage_model.decoder.mid.attn_1.v.bias",
    "decoder.conv_norm_out.weight": "first_stage_model.decoder.norm_out.weight",
}


def test_each_layouts_names_read_as_the_originals():
    assert {key: original_name(key, levels=4) for key in NAMES} == NAMES
    assert vae_target("loss.discriminator.main.0.weight", 4) is None and vae_target("model_ema.decay", 4) is None


@pytest.fixture(scope="module")
def own_outputs(files) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode and the encode of the host checkpoint's own VAE."""
    return decode_and_encode(load_models(files["host"]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_gives_diffusers_decode_and_encode(files, own_outputs, layout):
    from reference import reference_vae_file

    reference = reference_vae_file(files[layout])
    latents, image, noise = vae_inputs()
    with torch.no_grad():
        expected_pixels = reference.decode(latents / reference.config.scaling_factor).sample
        posterior = reference.encode(image).latent_dist
        expected_latents = (posterior.mean + posterior.std * noise) * reference.config.scaling_factor
    pixels, encoded = decode_and_encode(load_models(files["host"], vae=files[layout]))
    assert_close(pixels, expected_pixels, f"{layout}: decode")
    assert_close(encoded, expected_latents, f"{layout}: encode")
    for what, own, expected in zip(("decode", "encode"), own_outputs, (expected_pixels, expected_latents)):  # the file made the difference
        effect = ((own - expected).abs().max() / expected.abs().max()).item()
        print(f"{layout}: {what} by the checkpoint's own VAE: ratio {effect:.3g}")
        assert effect > 100 * RELATIVE_TOLERANCE


def test_swapping_the_vae_of_loaded_models_equals_loading_with_it(files):
    with_file = load_models(files["host"], vae=files["prefixed.safetensors"])
    models = load_models(files["host"])
    unet = models["diffusion"]
    swap_vae(models, files["diffusers.safetensors"])
    assert list(models) == ["clip", "encoder", "decoder", "diffusion"] and models["diffusion"] is unet
    for name in ("encoder", "decoder"):
        theirs = unpacked_state_dict(with_file[name])
        assert all(torch.equal(value, theirs[key]) for key, value in unpacked_state_dict(models[name]).items()), name
    # on a CPU the encoder keeps the file's pages (sd/files/loader.py), released after each use
    assert len(models["encoder"].mapped_parameters) > 0


def test_the_checkpoints_own_vae_is_not_needed(files):
    models = load_models(files["no-vae"], vae=files["bare.ckpt"])
    with_own = load_models(files["host"], vae=files["bare.ckpt"])
    assert torch.equal(decode_and_encode(models)[0], decode_and_encode(with_own)[0])
    with pytest.raises(SDError, match="not an SD 1.x checkpoint: tensors .* missing"):
        load_models(files["no-vae"])


def test_bf16_models_take_the_file_in_bf16(files):
    models = load_models(files["host"], dtype=torch.bfloat16)
    swap_vae(models, files["prefixed.safetensors"])
    assert {parameter.dtype for parameter in models["decoder"].parameters()} == {torch.bfloat16}


def test_generate_loads_the_vae_file_with_the_models(files):
    settings = dict(steps=1, seed=0, progress=False, dtype=torch.float32)  # as load_models's
    image, = generate("a red circle", checkpoint=files["host"], vae=files["prefixed.safetensors"], **settings)
    models = load_models(files["host"], vae=files["diffusers.safetensors"])
    image_loaded, = generate("a red circle", models=models, **settings)
    own, = generate("a red circle", checkpoint=files["host"], **settings)
    assert image.tobytes() == image_loaded.tobytes() != own.tobytes()
    with pytest.raises(SDError, match="give it to load_models"):
        generate("a red circle", models=models, vae=files["bare.ckpt"], **settings)


# The image's settings


def test_vae_fields_are_written_and_read_as_a1111_does():
    settings = Settings("a cat", steps=20, seed=1, width=512, height=512, model_hash="f8bb2922e1", model="revAnimated_v122",
                        vae_hash="551eac7037", vae="vae-ft-mse-840000-ema-pruned.ckpt", clip_skip=2)
    assert ("Size: 512x512, Model hash: f8bb2922e1, Model: revAnimated_v122, VAE hash: 551eac7037, "
            "VAE: vae-ft-mse-840000-ema-pruned.ckpt, Clip skip: 2") in settings.to_infotext()
    assert read_infotext(settings.to_infotext()).settings == settings
    # A1111's own line (from a forum post, shared reference a1111-formats.md section 5)
    a1111 = ("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: f8bb2922e1, Model: revAnimated_v122, "
             "VAE hash: 551eac7037, VAE: vae-ft-mse-840000-ema-pruned.ckpt, Clip skip: 2, Version: v1.6.0")
    read = read_infotext(a1111)
    assert (read.settings.vae_hash, read.settings.vae, read.ignored) == ("551eac7037", "vae-ft-mse-840000-ema-pruned.ckpt", [])
    assert "VAE" not in Settings("a cat").to_infotext()


def sd(*args):
    return CliRunner().invoke(cli.main, ["generate", *map(str, args)], prog_name="sd")


def test_a_render_names_the_vae_file_and_from_warns_where_it_differs(files, command_environment):
    vae = files["prefixed.safetensors"]
    made = sd("--prompt", "a red circle", "--checkpoint", files["host"], "--vae", vae, "--steps", 1, "--output", "a.png")
    assert made.exit_code == 0, made.output
    short_hash = hashlib.sha256(vae.read_bytes()).hexdigest()[:10]
    assert f"Model: host, VAE hash: {short_hash}, VAE: prefixed.safetensors" in Image.open("a.png").text["parameters"]
    assert hashes.cached_sha256(vae)[:10] == short_hash  # hashed once, then read from the cache
    same = sd("--from", "a.png", "--checkpoint", files["host"], "--vae", vae, "--output", "b.png")
    assert same.exit_code == 0 and "VAE" not in same.stderr.replace("with the VAE prefixed", ""), same.output
    own = sd("--from", "a.png", "--checkpoint", files["host"], "--output", "c.png")
    assert own.exit_code == 0, own.output
    assert f"warning: a.png was made with the VAE prefixed.safetensors ({short_hash}), not the checkpoint's own: give that file as --vae" in own.stderr
    other = sd("--from", "a.png", "--checkpoint", files["host"], "--vae", files["diffusers.safetensors"], "--output", "d.png")
    assert other.exit_code == 0, other.output
    assert f"warning: a.png was made with the VAE prefixed.safetensors ({short_hash}), not diffusers.safetensors (" in other.stderr
    assert "VAE" not in Image.open("c.png").text["parameters"]


# Files that cannot serve: one line naming the file, exit 2, before the models load


class RunsCode:
    """Unpickled, makes the folder `marker`: what a malicious .ckpt could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def latent_channels_16(files: dict, path: Path) -> None:
    """A VAE of 16 latent channels in diffusers' layout, without quant_conv (SD 3's and Flux's VAEs)."""
    state = load_file(files["diffusers.safetensors"])
    state = {key: value for key, value in state.items() if "quant_conv" not in key}
    state["encoder.conv_out.weight"], state["encoder.conv_out.bias"] = torch.zeros(32, 512, 3, 3), torch.zeros(32)
    state["decoder.conv_in.weight"] = torch.zeros(512, 16, 3, 3)
    save_file({key: value.half() for key, value in state.items()}, path)


def cut_in_half(source: str):
    return lambda files, path: path.write_bytes(files[source].read_bytes()[: files[source].stat().st_size // 2])


BAD_FILES = {
    "for the demo model's VAE": ("sd15.safetensors", lambda files, path: path.symlink_to(files["prefixed.safetensors"]),
                                 "does not fit this model's VAE: tensors", "demo"),
    "16 latent channels": ("sd3.safetensors", latent_channels_16,
                           "does not fit this model's VAE: tensors 4 missing (encoder.quant_conv.weight, encoder.quant_conv.bias, "
                           "decoder.post_quant_conv.weight, decoder.post_quant_conv.bias); 3 with the wrong shape (", "host"),
    "an SDXL checkpoint": ("sdxl.safetensors", lambda files, path: save_file(
        {"conditioner.embedders.1.model.ln_final.weight": torch.ones(4), "first_stage_model.decoder.conv_out.bias": torch.zeros(3)}, path),
        "is an SDXL checkpoint, not a VAE alone", "host"),
    "an SD 2.x checkpoint": ("sd2.safetensors", lambda files, path: save_file(
        {"cond_stage_model.model.ln_final.weight": torch.ones(4), "first_stage_model.decoder.conv_out.bias": torch.zeros(3)}, path),
        "is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder), not a VAE alone", "host"),
    "no VAE tensors": ("lora.safetensors", lambda files, path: save_file(
        {"lora_unet_a.lora_down.weight": torch.zeros(4, 8), "lora_unet_a.lora_up.weight": torch.zeros(8, 4), "lora_unet_a.alpha": torch.ones(())}, path),
        "holds no VAE tensors (it holds lora_unet_a.alpha, lora_unet_a.lora_down.weight, lora_unet_a.lora_up.weight)", "host"),
    "a truncated .safetensors": ("cut.safetensors", cut_in_half("prefixed.safetensors"), "the file is truncated", "host"),
    "a truncated .ckpt": ("cut.ckpt", cut_in_half("bare.ckpt"), "is not a PyTorch checkpoint (no zip archive inside: truncated", "host"),
    "a pickled callable": ("code.ckpt", lambda files, path: torch.save({"state_dict": {"encoder.conv_in.bias": torch.zeros(128)},
                                                                        "payload": RunsCode(path.parent / "code-ran")}, path),
                           "refusing code.ckpt: it would call posix.mkdir", "host"),
}


@pytest.mark.parametrize("name, write, message, checkpoint", BAD_FILES.values(), ids=list(BAD_FILES))
def test_a_file_that_cannot_serve_is_one_line_exit_2_before_loading(files, command_environment, monkeypatch, name, write, message, checkpoint):
    write(files, Path(name))
    monkeypatch.setattr(cli, "cached_models", lambda *args: pytest.fail("the models were loaded"))
    result = sd("--prompt", "a red circle", "--checkpoint", files.get(checkpoint, checkpoint), "--vae", name, "--output", "x.png")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("error: ") and name in result.output and message in result.output, result.output
    assert not Path("code-ran").exists()


def test_a_missing_vae_file_is_a_usage_error(command_environment):
    result = sd("--prompt", "a red circle", "--checkpoint", "demo", "--vae", "nowhere.safetensors")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1 and "nowhere.safetensors" in result.output
