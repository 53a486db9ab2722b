"""ControlNet: loading original-layout files, parity with diffusers' ControlNetModel and
StableDiffusionControlNetPipeline on random full-size weights, canny, the infotext, generate() and the CLI with the
demo model and a small ControlNet of its size.

The heavy tests (full-size checkpoint and ControlNet) run under `flock /tmp/sd-heavy.lock`.
"""

import gc
import json

import numpy as np
import pytest
import torch
from checkpoints import unpacked_state_dict
from click.testing import CliRunner
from controlnets import control_params, controlnet_shapes, demo_sized_params, random_controlnet_state_dict, write_controlnet
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import cli
from sd import generate
from sd.control import ControlNetUnit, canny, control_image
from sd.models.controlnet import ControlNet
from sd.models.unet import UNetConfig
from sd.errors import SDError
from sd.files.converter import convert
from sd.files.loader import load_controlnet
from sd.pipeline import DEMO_CHECKPOINT
from sd.sampling.samplers import SAMPLERS
from sd.settings import Settings

DEMO_UNET = json.loads(__import__("safetensors").safe_open(str(DEMO_CHECKPOINT), "pt").metadata()["sd_config"])["unet"]
SMALL = dict(width=64, height=64, steps=2, seed=3, progress=False)


def drawn_map(size: int = 64) -> Image.Image:
    """White outlines on black: a circle and a square, as an edge map looks."""
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    draw.ellipse([size // 8, size // 8, size // 2, size // 2], outline="white", width=2)
    draw.rectangle([size // 2, size // 2, size - size // 8, size - size // 8], outline="white", width=2)
    return image


@pytest.fixture(scope="module")
def small_controlnet(tmp_path_factory):
    """A random ControlNet the size of the demo model's U-Net, as .safetensors (our config in its metadata)."""
    path = tmp_path_factory.mktemp("small-controlnet") / "control_small.safetensors"
    return write_controlnet(random_controlnet_state_dict(demo_sized_params(DEMO_UNET), seed=2), path, DEMO_UNET)


# --- loading ---------------------------------------------------------------------------------------------------

def test_every_key_of_the_original_controlnet_maps_once_with_its_shape():
    """The manifest is written from cldm_v15.yaml's control_stage_config as the original code names its layers; its
    encoder part is SD 1.5's own U-Net encoder, key for key (from the real checkpoint's key list)."""
    from checkpoints import sd15_shapes

    shapes = controlnet_shapes(control_params())
    unet = {key.removeprefix("model.diffusion_model."): shape for key, shape in sd15_shapes().items()
            if key.split(".")[2:3] in (["time_embed"], ["input_blocks"], ["middle_block"])}
    assert {key: shape for key, shape in shapes.items() if key.split(".")[0] in ("time_embed", "input_blocks", "middle_block")} == unet
    with torch.device("meta"):
        ours = ControlNet(UNetConfig())
    expected = {f"controlnet.{key}": value.shape for key, value in ours.state_dict().items()}
    # untouched pages: the 1.4 GB of "weights" take no memory
    tensors = {f"control_model.{key}": torch.empty(shape) for key, shape in shapes.items()}
    state = convert(tensors, expected, torch.float32)
    assert len(shapes) == 340 and set(state) == set(expected)  # 340 original tensors -> 316 of ours (q, k, v fused)
    assert all(state[name].shape == shape for name, shape in expected.items())


def test_bare_pth_and_full_controlldm_files_load_alike(small_controlnet, tmp_path):
    state = random_controlnet_state_dict(demo_sized_params(DEMO_UNET), seed=2, prefix="")
    bare = write_controlnet(state, tmp_path / "bare.pth")
    bare_safetensors = write_controlnet(state, tmp_path / "bare.safetensors", DEMO_UNET)
    with_sd = {**{f"control_model.{key}": value for key, value in state.items()}, "model.diffusion_model.out.2.bias": torch.zeros(4)}
    save_file(with_sd, str(tmp_path / "controlldm.safetensors"), metadata={"sd_config": json.dumps({"controlnet": DEMO_UNET})})
    reference = unpacked_state_dict(load_controlnet(small_controlnet))
    config = UNetConfig(**{key: tuple(value) if isinstance(value, list) else value for key, value in DEMO_UNET.items()})
    for path in (tmp_path / "controlldm.safetensors", bare_safetensors, bare):
        if path.suffix == ".pth":  # no metadata in a .pth: its sizes are SD 1.5's, which this small file's are not
            with pytest.raises(SDError, match="not an SD 1.5 ControlNet: tensors .* with the wrong shape"):
                load_controlnet(path)
            continue
        loaded = load_controlnet(path)
        assert loaded.config == config
        loaded_state = unpacked_state_dict(loaded)
        assert all(torch.equal(loaded_state[key], value) for key, value in reference.items())


@pytest.mark.parametrize("tensors, expected", [
    ({"control_model.input_hint_block.0.weight": [16, 3, 3, 3], "control_model." + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 2048]}, "an SDXL ControlNet"),
    ({"control_model.input_hint_block.0.weight": [16, 3, 3, 3], "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 1024]}, "an SD 2.x ControlNet"),
    ({"controlnet_cond_embedding.conv_in.weight": [16, 3, 3, 3]}, "a ControlNet in diffusers' layout"),
    ({"body.0.block1.weight": [320, 320, 3, 3], "conv_in.weight": [320, 192, 3, 3]}, "a T2I-Adapter"),
    ({"model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3]}, "a Stable Diffusion checkpoint, not a ControlNet"),
    ({"lora_controlnet": [1]}, "a Control-LoRA"),
    ({"something.else": [1]}, "not a ControlNet"),
])
def test_other_files_are_named(tmp_path, tensors, expected):
    path = tmp_path / "other.safetensors"
    save_file({key: torch.zeros(shape) for key, shape in tensors.items()}, str(path))
    with pytest.raises(SDError, match=expected):
        load_controlnet(path)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"control_model.input_hint_block.0.weight": torch.zeros(1), "x": Settings}, path)
    with pytest.raises(SDError, match="refusing .* it would call"):
        load_controlnet(path)


# --- canny, the control image, the infotext ---------------------------------------------------------------------

def test_canny_finds_the_edges_where_they_are():
    import cv2

    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[16:48, 20:44] = (200, 40, 90)  # a filled rectangle: its edges are its outline
    edges = canny(pixels, 100, 200)
    assert np.array_equal(edges[:, :, 0], cv2.Canny(pixels, 100, 200)) and np.array_equal(edges[:, :, 0], edges[:, :, 2])
    rows, columns = np.nonzero(edges[:, :, 0])
    assert {rows.min(), rows.max(), columns.min(), columns.max()} <= {15, 16, 47, 48, 19, 20, 43, 44}
    assert not edges[24:40, 28:36].any() and not edges[:10].any()  # nothing inside, nothing in the empty part
    on_outline = ((np.isin(rows, (15, 16, 47, 48)) & (columns >= 19) & (columns <= 44)) | (np.isin(columns, (19, 20, 43, 44)) & (rows >= 15) & (rows <= 48)))
    assert on_outline.all() and len(rows) >= 2 * (32 + 24) - 4  # the whole outline: every side, corners once


def test_control_image_is_resized_to_the_output_and_read_in_0_1():
    image = Image.new("RGB", (30, 50), (255, 0, 0))
    hint = control_image(image, ControlNetUnit("x.safetensors"), 64, 48)
    assert hint.shape == (1, 3, 48, 64) and hint[0, 0].min() == 1 and hint[0, 1:].max() == 0


def test_infotext_has_the_extensions_shape_and_reads_back():
    units = (ControlNetUnit("models/control_v11p_sd15_canny.pth", 0.5, 0.1, 0.9, False, "canny", 50, 150, "d14c016b"),
             ControlNetUnit("depth.safetensors", guess_mode=True))
    settings = Settings("a house", steps=20, seed=1, width=512, height=512, controlnets=units)
    text = settings.to_infotext()
    assert ('ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 0.5, Resize Mode: Just Resize, '
            'Threshold A: 50, Threshold B: 150, Guidance Start: 0.1, Guidance End: 0.9, Control Mode: Balanced"') in text
    assert 'ControlNet 1: "Module: none, Model: depth, Weight: 1, Resize Mode: Just Resize, Guidance Start: 0, Guidance End: 1, Control Mode: ControlNet is more important"' in text
    read = Settings.from_infotext(text).controlnets
    assert [(unit.name, unit.model_hash, unit.strength, unit.start, unit.end, unit.guess_mode, unit.preprocess, unit.canny_low)
            for unit in read] == [("control_v11p_sd15_canny", "d14c016b", 0.5, 0.1, 0.9, False, "canny", 50), ("depth", None, 1.0, 0.0, 1.0, True, "none", 100)]


@pytest.mark.parametrize("options, message", [
    (dict(strength=-0.1), "control strength must be a number of 0 or more, got -0.1"),
    (dict(strength=float("nan")), "control strength must be a number of 0 or more, got nan"),
    (dict(start=0.6, end=0.4), "0 <= start < end <= 1"),
    (dict(preprocess="depth"), "unknown control preprocessor 'depth'"),
    (dict(canny_low=200, canny_high=100), "canny thresholds"),
])
def test_bad_control_settings_are_refused(options, message):
    with pytest.raises(SDError, match=message):
        ControlNetUnit("x.pth", **options)


# --- generate() with the demo model ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_loaded(small_controlnet):
    return load_controlnet(small_controlnet)


def render(demo, controlnets=(), models=None, images=None, **options) -> np.ndarray:
    units = [unit if isinstance(unit, ControlNetUnit) else ControlNetUnit(str(unit)) for unit in controlnets]
    image, = generate("red circle", models=demo, controlnets=units, control_images=images or [drawn_map()] * len(units),
                      controlnet_models=models, **{**SMALL, **options})
    return np.asarray(image, dtype=np.int16)


def test_the_controlnet_changes_the_image_and_strength_0_or_no_steps_do_not(demo, small_controlnet, small_loaded):
    plain = render(demo)
    controlled = render(demo, [small_controlnet], [small_loaded])
    assert np.abs(controlled - plain).max() > 20
    assert np.array_equal(render(demo, [ControlNetUnit(str(small_controlnet), strength=0)], [small_loaded]), plain)
    # with 2 steps, a ControlNet from 0.6 to 1 has no step of its own: the second step's share starts at 0.5
    assert np.array_equal(render(demo, [ControlNetUnit(str(small_controlnet), start=0.6)], [small_loaded]), plain)
    assert not np.array_equal(render(demo, [ControlNetUnit(str(small_controlnet), start=0.5)], [small_loaded]), plain)


def test_every_sampler_image_to_image_inpainting_and_two_controlnets(demo, small_controlnet, small_loaded):
    unit = ControlNetUnit(str(small_controlnet), preprocess="canny", guess_mode=True)
    for name in SAMPLERS:
        assert render(demo, [unit], [small_loaded], sampler=name).std() > 1, name
    source = Image.fromarray(render(demo).astype(np.uint8))
    mask = Image.new("L", (64, 64))
    ImageDraw.Draw(mask).rectangle([0, 0, 31, 63], fill=255)
    image_to_image = render(demo, [unit], [small_loaded], input_image=source, strength=0.6)
    inpainted = render(demo, [unit], [small_loaded], input_image=source, mask=mask, mask_blur=0)
    assert np.array_equal(inpainted[:, 40:], np.asarray(source, dtype=np.int16)[:, 40:]) and image_to_image.std() > 1
    two = render(demo, [unit, ControlNetUnit(str(small_controlnet), strength=0.5)], [small_loaded, small_loaded],
                 images=[drawn_map(), Image.new("RGB", (32, 32), "white")])
    assert np.abs(two - render(demo, [unit], [small_loaded])).max() > 10


def test_hires_fix_is_guided_in_both_passes(demo, small_controlnet, small_loaded, monkeypatch):
    from sd import control

    sizes = []
    original = control.control_image
    monkeypatch.setattr(control, "control_image", lambda image, unit, width, height: sizes.append((width, height)) or original(image, unit, width, height))
    hires = dict(hires_scale=2, hires_steps=1, sampler="euler")
    controlled = render(demo, [small_controlnet], [small_loaded], **hires)
    assert sizes == [(64, 64), (128, 128)] and controlled.shape == (128, 128, 3)
    assert np.abs(controlled - render(demo, **hires)).max() > 20


def test_a_controlnet_without_its_control_image_is_refused_before_the_render(demo, small_controlnet):
    unit = ControlNetUnit(str(small_controlnet))
    with pytest.raises(SDError, match="^each ControlNet needs a control image, and each control image a ControlNet: got 1 ControlNet and 0 images$"):
        generate("red circle", models=demo, controlnets=[unit], **SMALL)
    with pytest.raises(SDError, match="^each ControlNet needs a control image, and each control image a ControlNet: got 2 ControlNets and 1 image$"):
        generate("red circle", models=demo, controlnets=[unit, unit], control_images=[drawn_map()], **SMALL)


def test_generate_loads_the_controlnet_and_records_it(demo, small_controlnet):
    from sd.files.hashes import old_hash

    image, = generate("red circle", models=demo, controlnets=[ControlNetUnit(str(small_controlnet), 0.8)], control_images=[drawn_map()], **SMALL)
    unit, = image.info["sd"].controlnets
    assert unit.model_hash == old_hash(small_controlnet) and len(unit.model_hash) == 8
    assert f"Model: control_small [{unit.model_hash}], Weight: 0.8" in image.info["sd"].to_infotext()


def test_a_controlnet_for_another_unet_is_refused(demo, tmp_path):
    other = {**DEMO_UNET, "base_width": 32, "num_groups": 8}
    path = write_controlnet(random_controlnet_state_dict(demo_sized_params(other)), tmp_path / "other.safetensors", other)
    with pytest.raises(SDError, match="made for another U-Net"):
        render(demo, [path])


# --- the command -------------------------------------------------------------------------------------------------

def sd(*args):
    return CliRunner().invoke(cli.main, ["generate", "--checkpoint", "demo", "--steps", "2", *map(str, args)], prog_name="sd")


def test_the_command_renders_with_two_controlnets_and_writes_them(small_controlnet, command_environment, tmp_path):
    drawn_map().save(tmp_path / "map.png")
    result = sd("--prompt", "red circle", "--output", "out.png", "--seed", 1, "--control-net", small_controlnet, "--control-image", "map.png",
                "--control-net", small_controlnet, "--control-image", "map.png", "--control-preprocess", "canny",
                "--control-strength", 1, "--control-strength", 0.5, "--control-end", 0.5, "--guess-mode")
    assert result.exit_code == 0, result.output
    text = Image.open(tmp_path / "out.png").info["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: control_small [' in text and "Weight: 0.5" in text and "Guidance End: 0.5" in text
    assert text.count("Control Mode: ControlNet is more important") == 2
    again = CliRunner().invoke(cli.main, ["generate", "--from", "out.png", "--steps", "2", "--output", "again.png"], prog_name="sd")
    assert again.exit_code == 0 and "ignored from out.png: ControlNet 0, ControlNet 1 (give --control-net and --control-image for them)" in again.output


@pytest.fixture
def loading_fails(monkeypatch):
    """Any model load fails the test: a refusal must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli, "cached_models", refuse)
    monkeypatch.setattr(cli, "cached_controlnets", refuse)


@pytest.mark.parametrize("args, message", [
    (["--control-net", "{net}"], "each --control-net needs a --control-image"),
    (["--control-net", "{net}", "--control-image", "text.png"], "--control-image text.png is not an image"),
    (["--control-net", "{sdxl}", "--control-image", "map.png"], "is an SDXL ControlNet, not one for SD 1.5"),
    (["--control-net", "{net}", "--control-image", "map.png", "--control-strength", "-1"], "control strength must be a number of 0 or more"),
    (["--control-net", "{net}", "--control-image", "map.png", "--control-start", "0.7", "--control-end", "0.3"], "0 <= start < end <= 1"),
    (["--control-net", "missing.pth", "--control-image", "map.png"], "ControlNet not found: missing.pth"),
    (["--control-net", "{net}", "--control-image", "map.png", "--control-strength", "1", "--control-strength", "2"], "--control-strength given 2 times for 1"),
])
def test_bad_control_input_is_one_line_before_loading(small_controlnet, command_environment, loading_fails, tmp_path, args, message):
    drawn_map().save(tmp_path / "map.png")
    (tmp_path / "text.png").write_text("not an image")
    save_file({"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3),
               "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 2048)}, str(tmp_path / "sdxl.safetensors"))
    result = sd("--prompt", "x", *[arg.format(net=small_controlnet, sdxl=tmp_path / "sdxl.safetensors") for arg in args])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: ") and message in result.output, result.output


def test_the_benchmark_measures_a_step_with_and_without_a_controlnet(small_controlnet, tmp_path):
    """benchmarks/benchmark.py --only controlnet, on the demo model and the small ControlNet."""
    import subprocess
    import sys

    from test_benchmark import BENCHMARK

    output = tmp_path / "results.json"
    command = [sys.executable, str(BENCHMARK), "--checkpoints", str(DEMO_CHECKPOINT), "--controlnet", str(small_controlnet), "--only", "controlnet",
               "--dtypes", "fp32", "--sizes", "64", "--repeat", "1", "--output", str(output)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    result, = (r for r in json.loads(output.read_text())["results"] if r["group"] == "controlnet")
    assert result["controlnet_load_s"] > 0 and result["controlnet_rss_gib"] > 0 and result["peak_rss_gib"] > 0
    assert result["unet_step_s"]["runs"] == result["controlled_unet_step_s"]["runs"] == 1
    assert "fp32 one ControlNet, U-Net at 64x64" in finished.stdout


# --- parity with diffusers ----------------------------------------------------------------------------------------

def residuals_and_reference(ours: ControlNet, reference, height: int, width: int, context_width: int):
    """Both sides' residuals for the same random latents (batch 2), context and drawn control image."""
    generator = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, height // 8, width // 8, generator=generator), torch.randn(2, 77, context_width, generator=generator)
    hint = torch.from_numpy(np.asarray(drawn_map(width).resize((width, height)), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.inference_mode():
        down, middle = reference(latents, 500, encoder_hidden_states=context, controlnet_cond=hint.expand(2, -1, -1, -1), return_dict=False)
        residuals = ours(latents, ours.encode_hint(hint), context, 500)
    assert len(residuals) == len(down) + 1
    assert all(b.abs().max() > 0.1 for b in [*down, middle])  # the zero convolutions are not zero
    errors = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(residuals, [*down, middle])]
    print(f"ControlNet residuals ({len(residuals)}): max relative error {max(errors):.2e}")
    return max(errors)


def test_small_controlnet_residuals_match_diffusers(tmp_path):
    """A small copy of cldm_v15.yaml's ControlNet (2 levels, 64 wide, a 32-wide text context), converted by diffusers'
    own single-file code from the same file: cheap, so it runs beside the heavy full-size test below."""
    from controlnets import cldm_config
    from reference import reference_controlnet

    config = cldm_config()
    small = dict(model_channels=64, channel_mult=[1, 2], attention_resolutions=[1, 2], num_res_blocks=1, context_dim=32, num_heads=8)
    for stage in ("control_stage_config", "unet_config"):
        config["model"]["params"][stage]["params"].update(small)
    ours_config = dict(base_width=64, width_multipliers=[1, 2], attention_levels=[0, 1], blocks_per_level=1, num_heads=8, context_width=32)
    path = write_controlnet(random_controlnet_state_dict(config["model"]["params"]["control_stage_config"]["params"], seed=4),
                            tmp_path / "small.safetensors", ours_config)
    assert residuals_and_reference(load_controlnet(path), reference_controlnet(path, config), 64, 80, 32) <= 1e-4


# --- parity with diffusers on full-size random weights (heavy) -------------------------------------------------

@pytest.fixture(scope="module")
def full_size(safetensors_checkpoint, controlnet_file):
    """Ours and diffusers' models: the SD 1.5 pipeline's and the ControlNet's, from the same random files."""
    from diffusers import DDIMScheduler
    from reference import reference_controlnet, reference_pipeline
    from test_pipeline_parity import SD15_SCHEDULER

    from controlnets import cldm_config
    from sd import load_models

    reference = reference_pipeline(safetensors_checkpoint, DDIMScheduler.from_config(SD15_SCHEDULER))
    yield load_models(safetensors_checkpoint), load_controlnet(controlnet_file), reference, reference_controlnet(controlnet_file, cldm_config())
    gc.collect()


def test_residuals_match_diffusers_controlnetmodel(full_size):
    _, ours, _, reference = full_size
    assert len(ours.zero_convs) + 1 == 13
    assert residuals_and_reference(ours, reference, 256, 320, 768) <= 1e-4


PARITY_RENDER = dict(sampler="ddim", steps=3, cfg_scale=7.5, width=64, height=64, progress=False)


@pytest.fixture(scope="module")
def uncontrolled(full_size):
    """Our image without a ControlNet, which each controlled image must differ from."""
    from test_pipeline_parity import PROMPT

    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    return latents, np.asarray(generate(**PROMPT, **PARITY_RENDER, latents=latents, models=full_size[0])[0], dtype=np.float64)


# Each of strength, guess mode, the end of the guidance and a second ControlNet apart from the plain case, with
# strengths below 1 where they meet guess mode's scales and the sum of two ControlNets (11 s a case here).
@pytest.mark.parametrize("strength, guess_mode, start, end, twice", [
    (1.0, False, 0.0, 1.0, False), (0.5, True, 0.0, 1.0, False), (1.0, False, 0.0, 0.67, False), (0.5, False, 0.0, 1.0, True),
])
def test_pipeline_matches_diffusers(full_size, uncontrolled, controlnet_file, strength, guess_mode, start, end, twice):
    from diffusers import StableDiffusionControlNetPipeline
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
    from test_pipeline_parity import PROMPT, assert_same_image, scheduler

    models, ours, reference, reference_controlnet = full_size
    maps = [drawn_map(), Image.new("RGB", (64, 64), (255, 128, 0))][: 1 + twice]
    strengths = [strength, 1.0][: 1 + twice]
    controlnet = MultiControlNetModel([reference_controlnet] * 2) if twice else reference_controlnet
    pipeline = StableDiffusionControlNetPipeline(**{**reference.components, "scheduler": scheduler("ddim")}, controlnet=controlnet)
    latents, plain = uncontrolled
    expected = pipeline(**PROMPT, image=maps if twice else maps[0], num_inference_steps=3, guidance_scale=7.5, height=64, width=64,
                        latents=latents.clone(), output_type="np", controlnet_conditioning_scale=strengths if twice else strength,
                        guess_mode=guess_mode, control_guidance_start=start, control_guidance_end=end).images[0]
    units = [ControlNetUnit(str(controlnet_file), s, start, end, guess_mode) for s in strengths]
    actual = generate(**PROMPT, **PARITY_RENDER, latents=latents, models=models, controlnets=units, control_images=maps,
                      controlnet_models=[ours] * len(units))[0]
    effect = np.abs(plain - np.round(expected * 255)).max()
    print(f"without the ControlNet: max pixel difference {effect:.0f}/255")
    assert effect > 8
    assert_same_image(actual, expected, f"ControlNet pipeline, strength {strength}, guess mode {guess_mode}, {start}-{end}, {1 + twice} ControlNets")
