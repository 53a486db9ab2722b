"""Inpainting (sd/inpaint.py), both ways.

Ordinary checkpoints: with the known latents put back after every step, every sampler's run equals the loop of
diffusers' StableDiffusionInpaintPipeline for a 4-channel U-Net, on test_samplers' toy model and at its
tolerance (1e-5 of the largest magnitude, for its reasons); the final latents outside the mask are the image's
exactly, and so are the output's pixels beyond the feathered edge. Inpainting checkpoints: generate() gives the
image of diffusers' pipeline on a random 9-channel checkpoint, to 1/255 (test_pipeline_parity's tolerance and
reasons). The mask is read exactly as diffusers' mask processor reads it. Bad masks fail before any model loads.

The full-size tests write their own random inpainting checkpoint (4.3 GB) and take the ordinary U-Net from it.
"""

import gc
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from checkpoints import random_sd15_state_dict, unpacked_state_dict, write_checkpoint
from click.testing import CliRunner
from diffusers import StableDiffusionInpaintPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageFilter
from reference import reference_clip, reference_tokenizer, reference_unet, reference_vae
from test_cli import read_parameters
from test_pipeline_parity import PROMPT, assert_same_image
from test_samplers import DETERMINISTIC, SHAPE, ToyModel, assert_same_run, reference_scheduler, step_options

import cli
from sd import SDError, generate, load_models
from sd.models.unet import UNet, UNetConfig
from sd.inpaint import paste_back, read_mask, repaint_cells
from sd.files.loader import UNET_FIRST_CONV
from sd.pipeline import is_inpainting_model
from sd.sampling.samplers import KnownRegion, sample

NOWHERE = "/nowhere/model.safetensors"  # a checkpoint error instead of ours would mean the check came too late
SMALL = dict(width=64, height=64, progress=False)
# diffusers' schedulers trip numpy 2's deprecation of __array__ without `copy`
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def photo(size: int = 64) -> Image.Image:
    """Noise over a gradient: varied, so a wrong pixel shows."""
    pixels = np.random.default_rng(3).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(np.clip(pixels // 2 + np.linspace(0, 127, size, dtype=np.uint8)[:, None, None], 0, 255))


def disc_mask(size: int, mode: str = "RGB") -> Image.Image:
    """A white disc with a soft edge, off the 8-pixel grid, on black."""
    rows, columns = np.mgrid[:size, :size]
    distance = np.hypot(rows - 0.37 * size, columns - 0.55 * size)
    gray = np.clip((0.2 * size - distance) * 600 / size + 128, 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert(mode)


# ---- the samplers: known latents put back after every step ----

REPAINT = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
REPAINT[..., 2:6, 3:8] = True


def reference_inpaint_loop(scheduler, model, latents, timesteps, options, image_latents, noise) -> torch.Tensor:
    """The denoising loop of diffusers' StableDiffusionInpaintPipeline for a 4-channel U-Net."""
    repaint = REPAINT.float()
    for i, timestep in enumerate(timesteps):
        model_output = model(scheduler.scale_model_input(latents, timestep), timestep)
        latents = scheduler.step(model_output, timestep, latents, **options(i)).prev_sample
        known = image_latents if i == len(timesteps) - 1 else scheduler.add_noise(image_latents, noise, timesteps[i + 1 : i + 2])
        latents = (1 - repaint) * known + repaint * latents
    return latents


def inpaint_run(name, karras, steps, strength):
    generator = torch.Generator().manual_seed(0)
    image_latents, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    ours, expected = ToyModel(), ToyModel()
    # at full strength inpainting starts from pure noise, as diffusers' pipeline does
    start = None if strength == 1.0 else image_latents
    known = KnownRegion(image_latents, REPAINT)
    our_latents = sample(name, ours, noise, steps, torch.Generator().manual_seed(2), start, strength, progress=False, karras=karras, known=known)

    scheduler = reference_scheduler(name, karras)
    scheduler.set_timesteps(steps)
    timesteps, _ = StableDiffusionInpaintPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
    latents = noise * scheduler.init_noise_sigma if strength == 1.0 else scheduler.add_noise(image_latents, noise, timesteps[:1])
    expected_latents = reference_inpaint_loop(scheduler, expected, latents, timesteps, step_options(name, 0.0, seed=2), image_latents, noise)
    return ours, our_latents, expected, expected_latents, image_latents


SAMPLER_CASES = [
    (name, karras, steps, strength)
    for name, karras in [*DETERMINISTIC, ("ddpm", False), ("euler_a", False)]
    for steps, strength in [(1, 1.0), (4, 1.0), (20, 1.0), (4, 0.6), (20, 0.6)]
    # diffusers' PLMS mistakes the timesteps of a shortened run (see test_samplers)
    if not (name == "pndm" and strength < 1)
]


@pytest.mark.parametrize("name, karras, steps, strength", SAMPLER_CASES)
def test_every_sampler_keeps_the_known_latents_as_diffusers_inpainting_does(name, karras, steps, strength):
    ours, our_latents, expected, expected_latents, image_latents = inpaint_run(name, karras, steps, strength)
    worst = assert_same_run(ours, our_latents, expected, expected_latents)
    print(f"{name}{' karras' * karras} inpainting, {steps} steps at {strength}: max relative difference {worst:.1e}")
    kept = ~REPAINT.expand(SHAPE)
    assert torch.equal(our_latents[kept], image_latents[kept])
    assert not torch.allclose(our_latents[~kept], image_latents[~kept], atol=0.1)


# ---- the mask ----


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "1", "P"])
def test_mask_is_read_as_diffusers_reads_it(mode):
    # at twice the size, soft-edged: the resizing and the threshold both count
    mask = disc_mask(128, mode)
    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    expected = processor.preprocess(mask, height=64, width=64)
    ours = read_mask(mask, (64, 64), 64, 64)
    assert 0 < ours.mean() < 0.5
    assert torch.equal(ours, expected)


def test_a_mask_of_the_same_shape_at_another_size_is_resized():
    mask = Image.new("L", (150, 100), 255)
    assert read_mask(mask, (301, 200), 96, 64).shape == (1, 1, 64, 96)  # 301 / 200 is within 1% of 3 / 2


def test_a_latent_cell_is_repainted_if_any_of_its_pixels_is():
    repaint = torch.zeros(1, 1, 16, 24)
    repaint[..., 0, 0] = repaint[..., 9, 23] = 1  # one pixel in cell (0, 0), one in cell (1, 2)
    expected = torch.tensor([[True, False, False], [False, False, True]])
    assert torch.equal(repaint_cells(repaint, (2, 3))[0, 0], expected)


def test_pasting_back_fades_over_the_blur_radius():
    generated, original = Image.new("RGB", (64, 64), (255, 255, 255)), Image.new("RGB", (64, 64))
    repaint = torch.zeros(1, 1, 64, 64)
    repaint[..., 32:] = 1  # the right half
    hard = np.asarray(paste_back(generated, original, repaint, 0))[32, :, 0]
    assert (hard[:32] == 0).all() and (hard[32:] == 255).all()
    soft = np.asarray(paste_back(generated, original, repaint, 4))[32, :, 0].astype(int)
    # three radii from the edge the blur is spent; across it the two blend, the generated image rising
    assert (soft[: 32 - 12] == 0).all() and (soft[32 + 12 :] == 255).all()
    assert (np.diff(soft) >= 0).all() and 0 < soft[28] < soft[31] < soft[32] < soft[35] < 255


# ---- bad input, refused before any model loads ----


def test_mask_without_an_input_image_is_refused():
    with pytest.raises(SDError, match="a mask needs the image it masks: give the input image too"):
        generate("x", mask=Image.new("L", (64, 64), 255), checkpoint=NOWHERE, **SMALL)


def test_mask_of_another_aspect_ratio_is_refused():
    with pytest.raises(SDError, match=r"the mask is 64x64 but the input image is 96x64: their aspect ratios differ \(1.000 and 1.500\)"):
        generate("x", input_image=Image.new("RGB", (96, 64)), mask=Image.new("L", (64, 64), 255), checkpoint=NOWHERE, **SMALL)


def test_all_black_mask_is_refused():
    with pytest.raises(SDError, match="the mask is all black, so there is nothing to repaint"):
        generate("x", input_image=photo(), mask=Image.new("1", (64, 64), 0), checkpoint=NOWHERE, **SMALL)


def test_all_white_mask_warns_that_it_is_image_to_image(caplog):
    # the run itself is test_all_white_mask_gives_image_to_image
    with pytest.raises(SDError, match="checkpoint not found"):
        generate("x", input_image=photo(), mask=Image.new("L", (64, 64), 255), checkpoint=NOWHERE, **SMALL)
    assert "the mask is all white, so the whole image is repainted: this is plain image-to-image" in caplog.text


def test_negative_mask_blur_is_refused():
    with pytest.raises(SDError, match="mask blur must be 0 or more pixels, got -1"):
        generate("x", input_image=photo(), mask=disc_mask(64), mask_blur=-1, checkpoint=NOWHERE, **SMALL)


def test_a_unet_neither_sd15_nor_inpainting_is_refused():
    with pytest.raises(SDError, match="the checkpoint's U-Net takes 8 input channels"):
        is_inpainting_model(SimpleNamespace(config=UNetConfig(in_channels=8)))


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--mask", "mask.png"], "error: a mask needs the image it masks: give the input image too (--input)"),
        (["--input", "photo.png", "--mask", "notes.txt"], "error: --mask notes.txt is not an image"),
        (["--input", "wide.png", "--mask", "mask.png"], "error: the mask is 64x64 but the input image is 96x64"),
        (["--input", "photo.png", "--mask", "black.png"], "error: the mask is all black"),
        (["--input", "photo.png", "--mask", "mask.png", "--mask-blur", "-1"], "'--mask-blur': -1 is not in the range x>=0"),
    ],
)
def test_bad_masks_are_refused_by_the_command_before_loading(tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    photo().save("photo.png")
    Image.new("RGB", (96, 64)).save("wide.png")
    disc_mask(64).save("mask.png")
    Image.new("L", (64, 64)).save("black.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "not-a-checkpoint.safetensors").write_bytes(b"\0" * 100)
    result = CliRunner().invoke(cli.main, ["generate", "--prompt", "x", *args, "--checkpoint", "not-a-checkpoint.safetensors"])
    assert result.exit_code == 2 and expected in result.output, result.output
    assert not (tmp_path / "outputs").exists()


# ---- full size: a random inpainting checkpoint, and the ordinary U-Net taken from it ----


@pytest.fixture(scope="module")
def inpainting_checkpoint(tmp_path_factory):
    """Random weights under the original names; only the U-Net's first convolution differs from SD 1.5's."""
    state = random_sd15_state_dict(seed=1, overrides={UNET_FIRST_CONV: [320, 9, 3, 3]})
    path = write_checkpoint(state, tmp_path_factory.mktemp("inpainting") / "random-sd15-inpainting.safetensors")
    del state
    gc.collect()
    yield path
    path.unlink()


@pytest.fixture(scope="module")
def inpainting_models(inpainting_checkpoint):
    models = load_models(inpainting_checkpoint)
    yield models
    del models
    gc.collect()


@pytest.fixture(scope="module")
def ordinary_models(inpainting_models):
    """An SD 1.5 U-Net without a second 4 GB checkpoint: the inpainting one with its first convolution cut to the
    4 latent channels (a view, no copy)."""
    state = unpacked_state_dict(inpainting_models["diffusion"])
    state["input_blocks.0.0.weight"] = state["input_blocks.0.0.weight"][:, :4]
    with torch.device("meta"):
        unet = UNet(UNetConfig())
    unet.load_state_dict(state, strict=True, assign=True)
    return {**inpainting_models, "diffusion": unet.eval()}


@pytest.fixture(scope="module")
def reference_components(inpainting_checkpoint):
    components = dict(
        vae=reference_vae(inpainting_checkpoint), text_encoder=reference_clip(inpainting_checkpoint), tokenizer=reference_tokenizer(),
        unet=reference_unet(inpainting_checkpoint), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    assert components["unet"].config.in_channels == 9
    yield components
    del components
    gc.collect()


@pytest.mark.parametrize(
    "name, given_latents, strength",
    [("ddim", True, None), ("ddpm", True, None), ("euler", False, None), ("ddim", False, 0.7)],
)
def test_inpainting_checkpoint_matches_diffusers(inpainting_models, reference_components, name, given_latents, strength):
    pipeline = StableDiffusionInpaintPipeline(**reference_components, scheduler=reference_scheduler(name, False))
    image, mask = photo(), disc_mask(128)  # the mask at twice the image's size, resized by both sides
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11)) if given_latents else None
    # Both draw from a CPU generator seeded alike: the image's encoder noise (below full strength), the starting
    # noise (without latents), the masked image's encoder noise, then DDPM's noise at each step.
    expected = pipeline(
        **PROMPT, image=image, mask_image=mask, strength=strength or 1.0, num_inference_steps=3, guidance_scale=7.5, height=64, width=64,
        latents=None if latents is None else latents.clone(), generator=torch.Generator().manual_seed(5), output_type="np",
    ).images[0]
    actual, = generate(
        **PROMPT, input_image=image, mask=mask, strength=strength, sampler=name, steps=3, cfg_scale=7.5, seed=5, latents=latents,
        models=inpainting_models, **SMALL,
    )
    assert actual.info["sd"].strength == (strength or 1.0)  # 1 unless given, for an inpainting checkpoint
    assert_same_image(actual, expected, f"{name} inpainting checkpoint{' from latents' * given_latents}")


def test_inpainting_checkpoint_without_a_mask_repaints_everything(inpainting_models, reference_components):
    # text-to-image: the conditioning of an all-white mask, as diffusers' pipeline makes for one
    pipeline = StableDiffusionInpaintPipeline(**reference_components, scheduler=reference_scheduler("euler", False))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    expected = pipeline(
        **PROMPT, image=photo(), mask_image=Image.new("L", (64, 64), 255), num_inference_steps=3, guidance_scale=7.5, height=64, width=64,
        latents=latents.clone(), generator=torch.Generator().manual_seed(5), output_type="np",
    ).images[0]
    actual, = generate(**PROMPT, sampler="euler", steps=3, cfg_scale=7.5, seed=5, latents=latents, models=inpainting_models, **SMALL)
    assert_same_image(actual, expected, "inpainting checkpoint, text to image")


@pytest.fixture
def latents_seen(ordinary_models):
    """The encoder's outputs and the decoder's inputs of each run."""
    seen = {"encoded": [], "decoded": []}
    hooks = [
        ordinary_models["encoder"].register_forward_hook(lambda module, args, output: seen["encoded"].append(output)),
        ordinary_models["decoder"].register_forward_pre_hook(lambda module, args: seen["decoded"].append(args[0])),
    ]
    yield seen
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("name, mask_blur, strength", [("euler_a", 4, None), ("heun", 0, 1.0)])
def test_ordinary_checkpoint_keeps_the_image_outside_the_mask(ordinary_models, latents_seen, name, mask_blur, strength):
    image, mask = photo(), disc_mask(64)
    output, = generate("a red apple", input_image=image, mask=mask, mask_blur=mask_blur, strength=strength, sampler=name, steps=2, seed=3, models=ordinary_models, **SMALL)
    assert output.info["sd"].strength == (strength or 0.8)
    assert output.info["sd"].inpainted and output.info["sd"].mask_blur == mask_blur

    # the latents: every cell without a white pixel ends as the image's own, exactly
    white = np.asarray(mask.convert("L")) >= 128
    kept_cells = torch.from_numpy(~white.reshape(8, 8, 8, 8).any(axis=(1, 3)))  # (8, 8) cells of 8x8 pixels
    assert 0 < kept_cells.sum() < 64
    image_latents, final = latents_seen["encoded"][0], latents_seen["decoded"][0]
    assert torch.equal(final[..., kept_cells], image_latents[..., kept_cells])
    assert not torch.allclose(final[..., ~kept_cells], image_latents[..., ~kept_cells], atol=0.1)

    # the pixels: the input's beyond three blur radii of the mask (where the Gaussian is spent), repainted inside
    reach = 2 * 3 * mask_blur + 1
    near = np.asarray(Image.fromarray(white).convert("L").filter(ImageFilter.MaxFilter(reach))) > 0
    assert (~near).sum() > 1500
    ours, original = np.asarray(output), np.asarray(image)
    assert np.array_equal(ours[~near], original[~near])
    assert np.abs(ours[white].astype(int) - original[white]).max() > 50


def test_all_white_mask_gives_image_to_image(ordinary_models):
    settings = dict(input_image=photo(), strength=0.5, seed=4, steps=2, models=ordinary_models, **SMALL)
    inpainted, = generate("a blue house", mask=Image.new("L", (64, 64), 255), **settings)
    plain, = generate("a blue house", **settings)
    assert np.array_equal(np.asarray(inpainted), np.asarray(plain))


@pytest.mark.parametrize("kind, expected", [("ordinary", {"Denoising strength": "0.8", "Mask blur": "4"}), ("inpainting", {"Denoising strength": "1"})])
def test_command_records_the_inpainting_in_the_png(tmp_path, monkeypatch, ordinary_models, inpainting_models, inpainting_checkpoint, kind, expected):
    monkeypatch.chdir(tmp_path)
    models = ordinary_models if kind == "ordinary" else inpainting_models
    monkeypatch.setattr(cli, "load", lambda checkpoint, vae, device, dtype: models)
    monkeypatch.setattr(cli, "model_files", lambda checkpoint, vae: {"model_hash": "0123456789", "model": checkpoint.stem})  # not read whole
    photo().save("photo.png")
    disc_mask(64).save("mask.png")
    args = ["--prompt", "a cat", "--input", "photo.png", "--mask", "mask.png", "--steps", 2, "--width", 64, "--height", 64, "--seed", 1]
    result = CliRunner().invoke(cli.main, ["generate", *map(str, args), "--checkpoint", str(inpainting_checkpoint), "--output", "cat.png"])
    assert result.exit_code == 0, result.output
    fields = read_parameters(tmp_path / "cat.png")
    assert fields["Inpainted"] == "yes"
    assert {name: fields.get(name) for name in ("Denoising strength", "Mask blur")} == {"Mask blur": None, **expected}
