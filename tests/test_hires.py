"""Hires fix as AUTOMATIC1111 (A1111) does it: its sizes, its second-pass steps, its parity with diffusers'
image-to-image pipeline on the upscaled latents, and its metadata as A1111 writes it, read back by sd and by
sd-parsers.

The expected infotexts are written by hand from the rules in /work/shared/reference/a1111-formats.md (section
"2. Hires fix as A1111 does it") and A1111 images seen in the wild, not produced by our writer.
"""

import re
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from checkpoints import unpacked_state_dict
from click.testing import CliRunner
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from test_pipeline_parity import PROMPT, assert_same_image, both, scheduler  # noqa: F401 (both: a fixture)

import cli
from sd import SDError, Settings, generate
from sd.models.unet import UNet
from sd.hires import hires_schedule
from sd.sampling.schedule import euler_schedule, leading_timesteps
from sd.settings import read_infotext

DEMO_PROMPT = "a red circle on the left"


@pytest.fixture
def unet_inputs(demo):
    """The latent size and the timestep of every U-Net call."""
    calls = []
    handle = demo["diffusion"].register_forward_pre_hook(
        lambda module, args: calls.append((tuple(args[0].shape[-2:]), float(torch.as_tensor(args[2]).flatten()[0]))))
    yield calls
    handle.remove()


@pytest.mark.parametrize(
    "size, hires, expected",
    [
        ((64, 64), dict(hires_scale=2), (128, 128)),
        ((64, 64), dict(hires_scale=1.5, hires_upscaler="lanczos"), (96, 96)),  # decoded, resized, encoded
        ((64, 64), dict(hires_width=128, hires_upscaler="nearest"), (128, 128)),  # the aspect ratio kept
        ((64, 128), dict(hires_width=128, hires_height=128), (128, 128)),  # 128x256 cut at its center
        ((64, 128), dict(hires_width=128, hires_height=128, hires_upscaler="lanczos"), (128, 128)),
    ],
)
def test_the_output_has_the_hires_size_and_records_the_first_pass(demo, size, hires, expected):
    width, height = size
    image, = generate(DEMO_PROMPT, models=demo, steps=2, cfg_scale=1.0, seed=3, width=width, height=height, progress=False, **hires)
    assert image.size == expected
    made = image.info["sd"]
    assert (made.width, made.height, made.strength) == (width, height, None)
    assert made == Settings(DEMO_PROMPT, steps=2, cfg_scale=1.0, seed=3, width=width, height=height, **hires)


TIMESTEPS = {"ddim": leading_timesteps, "euler": lambda length: euler_schedule(length).timesteps}


@pytest.mark.parametrize("sampler, hires_sampler", [("ddim", None), ("euler", None), ("ddim", "euler")])
def test_the_second_pass_runs_the_last_hires_steps_of_a1111s_longer_schedule(demo, unet_inputs, sampler, hires_sampler):
    # 3 hires steps at strength 0.7: a schedule of int(3 / 0.7) = 4 steps, of which the last 3 run (plain
    # image-to-image would run int(3 * 0.7) = 2 of 3)
    generate(DEMO_PROMPT, models=demo, sampler=sampler, steps=2, cfg_scale=1.0, seed=1, width=64, height=64,
             hires_scale=2, hires_steps=3, hires_strength=0.7, hires_sampler=hires_sampler, progress=False)
    first = [((8, 8), t) for t in TIMESTEPS[sampler](2).tolist()]
    second = [((16, 16), t) for t in TIMESTEPS[hires_sampler or sampler](4)[1:].tolist()]
    assert [(size, pytest.approx(t, abs=1e-3)) for size, t in first + second] == unet_inputs


def test_an_inpainting_checkpoint_gets_text_to_image_conditioning_at_the_hires_size(demo):
    """The demo U-Net widened to an inpainting checkpoint's 9 input channels (the 5 new ones weighted 0)."""
    state = unpacked_state_dict(demo["diffusion"])
    first = state["input_blocks.0.0.weight"]  # (48, 4, 3, 3)
    state["input_blocks.0.0.weight"] = torch.cat([first, torch.zeros(first.shape[0], 5, *first.shape[2:])], dim=1)  # (48, 9, 3, 3)
    with torch.device("meta"):
        unet = UNet(replace(demo["diffusion"].config, in_channels=9))
    unet.load_state_dict(state, assign=True)
    inputs = []
    unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    image, = generate(DEMO_PROMPT, models={**demo, "diffusion": unet}, steps=2, cfg_scale=1.0, seed=1, width=64, height=64,
                      hires_scale=2, progress=False)
    assert image.size == (128, 128)
    assert [tuple(x.shape) for x in inputs] == [(1, 9, 8, 8)] * 2 + [(1, 9, 16, 16)] * 2
    # text-to-image's conditioning: the mask all 1 (repaint everything), then a gray image's latents, whose encoder
    # noise is drawn after the hires noise as text-to-image at 128x128 draws it after its starting noise
    second_pass = inputs[-1]
    assert torch.equal(second_pass[:, 4], torch.ones(1, 16, 16))
    generate(DEMO_PROMPT, models={**demo, "diffusion": unet}, steps=2, cfg_scale=1.0, seed=1, width=128, height=128, progress=False)
    assert torch.equal(second_pass[:, 5:], inputs[-1][:, 5:])


def test_a1111s_step_rule():
    assert hires_schedule(20, 0.7) == 28  # A1111: 20 hires steps at 0.7 run the last 20 of 28
    assert hires_schedule(20, 1.0) == 20  # strength capped at 0.999: int(20.02)
    assert hires_schedule(2, 0.5) == 4


def test_the_second_pass_of_the_same_seed_is_reproducible_and_draws_fresh_noise(demo):
    settings = dict(models=demo, steps=2, cfg_scale=1.0, width=64, height=64, hires_scale=2, progress=False)
    first, = generate(DEMO_PROMPT, seed=5, **settings)
    again, = generate(DEMO_PROMPT, seed=5, **settings)
    other, = generate(DEMO_PROMPT, seed=6, **settings)
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert np.abs(np.asarray(first, dtype=int) - np.asarray(other, dtype=int)).max() > 10


@pytest.mark.parametrize("name", ["euler"])  # ddim passes too; one sampler keeps the suite short (the step rule is one for all)
def test_the_second_pass_equals_diffusers_image_to_image_on_the_upscaled_latents(both, name):
    """Tolerance 1/255 per pixel, as for the other pipeline parity tests (test_pipeline_parity): the models and
    samplers agree to ~1e-5, far below one 8-bit level, but a value can land on a rounding boundary."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    ours, reference = both
    components = {**reference.components, "scheduler": scheduler(name)}
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    first_pass = StableDiffusionPipeline(**components)(
        **PROMPT, num_inference_steps=2, guidance_scale=7.5, height=64, width=64, latents=latents.clone(), output_type="latent",
    ).images  # (1, 4, 8, 8)
    upscaled = F.interpolate(first_pass, size=(16, 16), mode="bilinear", antialias=False)  # A1111's "Latent"
    # 2 hires steps at strength 0.5: the last 2 of a schedule of 4. diffusers runs int(4 * strength) of 4 steps, so
    # strength 2.5 / 4 runs exactly the last 2; its first draw from the generator is the noise, as our hires pass's.
    length, steps = hires_schedule(2, 0.5), 2
    expected = StableDiffusionImg2ImgPipeline(**components)(
        **PROMPT, image=upscaled, strength=(steps + 0.5) / length, num_inference_steps=length, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(5), output_type="np",
    ).images[0]
    actual, = generate(**PROMPT, sampler=name, steps=2, cfg_scale=7.5, width=64, height=64, seed=5, latents=latents,
                       hires_scale=2, hires_strength=0.5, models=ours, progress=False)
    assert actual.size == (128, 128)
    assert_same_image(actual, expected, f"{name} hires fix")


# What A1111 writes: Size is the first pass's, Denoising strength the second pass's, Hires steps only when not 0.
@pytest.mark.parametrize(
    "settings, fields",
    [
        (Settings("a cat", steps=20, sampler="dpmpp_2m", karras=True, cfg_scale=7.0, seed=1, width=512, height=512, hires_scale=2),
         "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.7, "
         "Hires upscale: 2, Hires upscaler: Latent"),
        (Settings("a cat", steps=28, sampler="euler_a", cfg_scale=8.0, seed=2, width=512, height=768, model_hash="fc2511737a",
                  model="chilloutmix", hires_scale=1.75, hires_steps=20, hires_strength=0.45, hires_upscaler="latent-bicubic-antialiased"),
         "Steps: 28, Sampler: Euler a, CFG scale: 8, Seed: 2, Size: 512x768, Model hash: fc2511737a, Model: chilloutmix, "
         "Denoising strength: 0.45, Hires upscale: 1.75, Hires steps: 20, Hires upscaler: Latent (bicubic antialiased)"),
        (Settings("a cat", steps=20, seed=3, width=512, height=768, hires_width=1024, hires_upscaler="lanczos"),
         "Steps: 20, Sampler: DDPM, CFG scale: 7.5, Seed: 3, Size: 512x768, Denoising strength: 0.7, Hires resize: 1024x0, "
         "Hires upscaler: Lanczos"),
        (Settings("a cat", steps=20, seed=3, width=512, height=768, hires_width=1024, hires_height=1024, hires_upscaler="latent-nearest"),
         "Steps: 20, Sampler: DDPM, CFG scale: 7.5, Seed: 3, Size: 512x768, Denoising strength: 0.7, Hires resize: 1024x1024, "
         "Hires upscaler: Latent (nearest)"),
        (Settings("a cat", steps=20, sampler="euler", seed=3, width=512, height=512, hires_scale=2, hires_sampler="dpmpp_2m", hires_karras=True),
         "Steps: 20, Sampler: Euler, CFG scale: 7.5, Seed: 3, Size: 512x512, Denoising strength: 0.7, Hires upscale: 2, "
         "Hires upscaler: Latent, Hires sampler: DPM++ 2M Karras"),
    ],
)
def test_the_infotext_is_a1111s_and_reads_back(settings, fields):
    assert settings.to_infotext() == f"a cat\n{fields}"
    infotext = read_infotext(settings.to_infotext())
    assert infotext.settings == settings and infotext.ignored == []


def test_an_a1111_hires_infotext_gives_its_settings():
    text = ("a girl\nSteps: 28, Sampler: DPM++ SDE Karras, CFG scale: 8, Seed: 7, Size: 512x768, Denoising strength: 0.45, "
            "ENSD: 31337, Hires upscale: 1.75, Hires steps: 20, Hires upscaler: Latent (bicubic antialiased)")
    settings = read_infotext(text.replace("DPM++ SDE Karras", "DPM++ 2M Karras")).settings
    assert (settings.width, settings.height, settings.hires_scale, settings.hires_steps) == (512, 768, 1.75, 20)
    assert (settings.hires_strength, settings.strength, settings.hires_upscaler) == (0.45, None, "latent-bicubic-antialiased")


def test_a1111_1_9s_hires_sampler_and_schedule_type_are_read():
    text = ("a cat\nSteps: 20, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512, "
            "Denoising strength: 0.5, Hires upscale: 2, Hires upscaler: Latent, Hires sampler: DPM++ 2M, Hires schedule type: Karras")
    infotext = read_infotext(text)
    assert (infotext.settings.hires_sampler, infotext.settings.hires_karras, infotext.ignored) == ("dpmpp_2m", True, [])
    assert read_infotext(text.replace("DPM++ 2M, Hires", "Use same sampler, Hires")).settings.hires_sampler is None


def test_stable_diffusion_cpps_hires_fields_are_read():
    # sd.cpp writes the upscaler's name in Hires upscale, the scale in Hires scale, floats as %f
    text = ("a cat\nSteps: 20, CFG scale: 7.000000, Seed: 3, Size: 512x512, Sampler: Euler a, Hires upscale: Latent, "
            "Hires scale: 2.000000, Hires resize: 0x0, Hires steps: 10, Denoising strength: 0.500000")
    settings = read_infotext(text).settings
    assert (settings.hires_scale, settings.hires_upscaler, settings.hires_steps, settings.hires_strength) == (2.0, "latent", 10, 0.5)
    resized = read_infotext(text.replace("Hires resize: 0x0", "Hires resize: 1024x768")).settings
    assert (resized.hires_scale, resized.hires_width, resized.hires_height) == (None, 1024, 768)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(hires_scale=0), "hires scale must be a number more than 0, got 0: 2 doubles"),
        (dict(hires_scale=float("inf")), "hires scale must be a number more than 0, got inf: 2 doubles"),
        (dict(width=64, height=64, hires_scale=1e308), "hires scale 1e+308 makes 64x64 larger than any number: 2 doubles the width and the height"),
        (dict(width=64, height=64, hires_scale=1.3), "hires scale 1.3 makes 64x64 into 83x83, and sizes must be multiples of 8 of at least 64: try hires scale 1.25"),
        # for 72x64, 1 is nearer 1.25, but no upscale; 1.889 makes 136x120
        (dict(width=72, height=64, hires_scale=1.25), "hires scale 1.25 makes 72x64 into 90x80, and sizes must be multiples of 8 of at least 64: try hires scale 1.889"),
        (dict(width=512, height=768, hires_width=1000), "hires width 1000 keeps the aspect ratio of 512x768 with a side of 1500, not a multiple of 8 of at least 64: try hires width 992"),
        (dict(hires_height=100), "hires height must be a multiple of 8 and at least 64, got 100: try 96"),
        (dict(hires_scale=2, hires_width=1024), "give a hires scale or a hires width and height, not both"),
        (dict(hires_scale=2, hires_strength=1.5), "hires strength must be in (0, 1], got 1.5"),
        (dict(hires_scale=2, hires_upscaler="nonsense"), "unknown hires upscaler 'nonsense': choose one of latent, "),
        (dict(hires_scale=2, strength=0.5), "hires fix is text-to-image: its strength is hires strength"),
        (dict(hires_scale=2, hires_sampler="pndm", hires_karras=True), "karras sigmas need a sampler that walks noise levels"),
        (dict(hires_scale=2, hires_steps=20, hires_strength=0.01), "20 hires steps at hires strength 0.01 make a schedule of 2000 steps, more than 999"),
    ],
)
def test_bad_hires_settings_are_one_line_errors(settings, message):
    with pytest.raises(SDError, match="^" + re.escape(message)) as error:
        Settings("x", **settings)
    assert "\n" not in str(error.value)


def test_an_unknown_upscaler_in_an_image_is_a_one_line_error():
    with pytest.raises(SDError, match=r"^Hires upscaler: the image's upscaler '4x-UltraSharp' is not one sd has: it has Latent, "):
        read_infotext("a cat\nSteps: 20, Size: 512x512, Denoising strength: 0.4, Hires upscale: 2, Hires upscaler: 4x-UltraSharp")


def test_hires_fix_with_an_input_image_is_refused(demo):
    with pytest.raises(SDError, match="^hires fix is text-to-image only"):
        generate(DEMO_PROMPT, models=demo, input_image=Image.new("RGB", (64, 64)), hires_scale=2)


def sd(*args):
    return CliRunner().invoke(cli.main, ["generate", *map(str, args)], prog_name="sd")


def test_the_command_writes_a1111s_fields_that_sd_parsers_reads(command_environment):
    from sd_parsers import ParserManager
    from sd_parsers.data import Generators

    result = sd("--prompt", DEMO_PROMPT, "--checkpoint", "demo", "--steps", 2, "--seed", 4, "--hires-scale", 2,
                "--hires-steps", 3, "--hires-strength", 0.6, "--hires-upscaler", "lanczos", "--output", "out.png")
    assert result.exit_code == 0, result.output
    image = Image.open("out.png")
    assert image.size == (128, 128)
    parsed = ParserManager().parse(image)
    assert parsed.generator == Generators.AUTOMATIC1111
    (sampler,) = parsed.samplers
    assert (sampler.name, sampler.parameters["steps"], sampler.parameters["seed"]) == ("DPM++ 2M Karras", "2", "4")
    assert {name: parsed.metadata[name] for name in ("Size", "Denoising strength", "Hires upscale", "Hires steps", "Hires upscaler")} == {
        "Size": "64x64", "Denoising strength": "0.6", "Hires upscale": "2", "Hires steps": "3", "Hires upscaler": "Lanczos"}
    made = Settings.from_infotext(image.text["parameters"])
    assert (made.hires_scale, made.hires_steps, made.hires_strength, made.hires_upscaler) == (2, 3, 0.6, "lanczos")


def test_from_an_a1111_hires_image_renders_with_hires_fix(command_environment):
    metadata = PngInfo()
    metadata.add_text("parameters", f"{DEMO_PROMPT}\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 9, Size: 64x64, "
                                    "Denoising strength: 0.45, Hires upscale: 1.5, Hires upscaler: Latent (nearest), Version: v1.10.1")
    Image.new("RGB", (96, 96)).save("a1111.png", pnginfo=metadata)
    result = sd("--from", "a1111.png", "--checkpoint", "demo", "--output", "again.png")
    assert result.exit_code == 0, result.output
    assert "warning: ignored" not in result.output  # Denoising strength is the hires pass's, not image-to-image's
    again = Image.open("again.png")
    assert again.size == (96, 96)
    written = again.text["parameters"]
    assert "Sampler: Euler, CFG scale: 7, Seed: 9, Size: 64x64, " in written
    assert written.endswith("Denoising strength: 0.45, Hires upscale: 1.5, Hires upscaler: Latent (nearest)")
