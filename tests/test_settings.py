"""Settings: their checks, and AUTOMATIC1111's infotext written and read back.

The expected infotexts are written by hand from the rules in /work/shared/reference/a1111-formats.md (section
"Infotext fields and hashes") and A1111's own output as seen in shared images, not produced by our writer.
"""

import re

import pytest

from sd import SDError, Settings
from sd.settings import read_infotext

EVERY_FIELD = [
    Settings("a photo of a cat, \"best\" quality:\nsitting on a mat", "blurry, lowres: 2\njpeg artifacts", steps=20,
             sampler="dpmpp_2m", karras=True, cfg_scale=7.0, seed=1234, width=512, height=768, strength=0.75, mask_blur=4,
             inpainted=True, model_hash="6ce0161689", model="v1-5, pruned: emaonly"),
    Settings("x", sampler="ddim", eta=0.3, steps=7, cfg_scale=12.25, seed=0, width=64, height=64),
    Settings("", sampler="euler_a", cfg_scale=1.0, seed=4294967295, width=64, height=128, mask_blur=0),
    Settings("z", seed=2**64 - 1, width=64, height=64),  # the largest seed torch takes (A1111's batches pass 2**32 - 1)
    Settings("a red circle on the left"),  # no seed, no size: those fields are left out
    *[Settings("y", sampler=name, karras=karras, seed=5, width=96, height=64)
      for name, karras in [("ddpm", False), ("pndm", False), ("lms", True), ("euler", False), ("heun", True), ("unipc", False)]],
]


@pytest.mark.parametrize("settings", EVERY_FIELD)
def test_settings_read_back_from_their_infotext_are_the_same(settings):
    assert Settings.from_infotext(settings.to_infotext()) == settings
    assert read_infotext(settings.to_infotext()).ignored == []


def test_the_infotext_is_a1111s_byte_for_byte():
    # The prompts as typed; fields in A1111's order; values with ", ", ":" or a newline as JSON strings.
    expected = (
        'a photo of a cat, "best" quality:\n'
        "sitting on a mat\n"
        "Negative prompt: blurry, lowres: 2\n"
        "jpeg artifacts\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, "
        'Model: "v1-5, pruned: emaonly", Denoising strength: 0.75, Mask blur: 4, Inpainted: yes'
    )
    assert EVERY_FIELD[0].to_infotext() == expected
    assert EVERY_FIELD[1].to_infotext() == "x\nSteps: 7, Sampler: DDIM, CFG scale: 12.25, Seed: 0, Size: 64x64, Eta DDIM: 0.3"
    assert Settings("a cat", seed=3, width=512, height=512, model_hash="0123456789", model="v1-5-pruned-emaonly").to_infotext() == (
        "a cat\nSteps: 50, Sampler: DDPM, CFG scale: 7.5, Seed: 3, Size: 512x512, Model hash: 0123456789, Model: v1-5-pruned-emaonly"
    )


A1111_1_10 = (
    "masterpiece, best quality, (a cat:1.2) sitting on a mat,\n"
    "window light\n"
    "Negative prompt: lowres, bad anatomy, text: watermark, (worst quality:1.4)\n"
    "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, ENSD: 31337, "
    'Lora hashes: "add_detail: 7c6bad76eb54, film: 1c2d3e4f5a6b", Version: v1.10.1'
)


def test_an_a1111_infotext_gives_its_settings_and_names_what_sd_ignores():
    infotext = read_infotext(A1111_1_10)
    assert infotext.settings == Settings(
        "masterpiece, best quality, (a cat:1.2) sitting on a mat,\nwindow light",
        "lowres, bad anatomy, text: watermark, (worst quality:1.4)", steps=30, sampler="dpmpp_2m", karras=True,
        cfg_scale=6.5, seed=3141592653, width=512, height=768, model_hash="6ce0161689", model="v1-5-pruned-emaonly",
        clip_skip=2, lora_hashes={"add_detail": "7c6bad76eb54", "film": "1c2d3e4f5a6b"},
    )
    assert infotext.ignored == ["ENSD"]  # Version is about the program, not the image
    assert infotext.fields["Lora hashes"] == "add_detail: 7c6bad76eb54, film: 1c2d3e4f5a6b"


def test_older_a1111_and_stable_diffusion_cpp_infotexts():
    old = read_infotext("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 6ce0161689, Clip skip: 1, ENSD: 31337")
    assert (old.settings.sampler, old.settings.karras, old.ignored) == ("euler_a", False, ["ENSD"])
    assert old.settings.clip_skip == 1
    sd_cpp = read_infotext("a cat\nNegative prompt: ugly\nSteps: 20, CFG scale: 7.000000, Seed: 42, Size: 512x512, "
                           "Sampler: dpm++2m, Denoising strength: 0.750000, Version: stable-diffusion.cpp")
    assert sd_cpp.settings == Settings("a cat", "ugly", steps=20, sampler="dpmpp_2m", cfg_scale=7.0, seed=42, width=512, height=512, strength=0.75)


@pytest.mark.parametrize(
    "sampler, schedule, expected",
    [("DPM++ 2M Karras", None, ("dpmpp_2m", True)), ("DPM++ 2M", None, ("dpmpp_2m", False)),
     ("DPM++ 2M", "Karras", ("dpmpp_2m", True)), ("DPM++ 2M", "Automatic", ("dpmpp_2m", True)),
     ("Euler", "Automatic", ("euler", False)), ("Euler", "Karras", ("euler", True)), ("UniPC", None, ("unipc", False)),
     ("PLMS", None, ("pndm", False)), ("LMS Karras", None, ("lms", True)), ("k_euler_a", None, ("euler_a", False)),
     ("euler_a", None, ("euler_a", False)), ("DDIM", None, ("ddim", False))],
)
def test_sampler_names(sampler, schedule, expected):
    schedule_field = f", Schedule type: {schedule}" if schedule else ""
    settings = Settings.from_infotext(f"x\nSteps: 20, Sampler: {sampler}{schedule_field}, CFG scale: 7")
    assert (settings.sampler, settings.karras) == expected


@pytest.mark.parametrize(
    "line, message",
    [
        ("Steps: many, Sampler: Euler", "Steps: 'many' in the image's settings is not a whole number"),
        ("Steps: 20, Sampler: DPM++ SDE Karras", "the image's sampler 'DPM++ SDE Karras' is not one sd has: it has DDPM, DDIM, PLMS"),
        ("Steps: 20, Sampler: Euler, Schedule type: Exponential", "the image's schedule type 'Exponential' is not one sd has"),
        ("Steps: 20, Size: 512", "Size: '512' in the image's settings is not WIDTHxHEIGHT"),
        ("Steps: 20, CFG scale: high", "CFG scale: 'high' in the image's settings is not a number"),
        ("Steps: 1000", "steps must be between 1 and 999, got 1000"),
        ("Steps: 20, Size: 100x64", "width must be a multiple of 8 and at least 64, got 100"),
        ("just a prompt", "the settings text has no line of fields"),
    ],
)
def test_unusable_infotexts_are_one_line_errors(line, message):
    with pytest.raises(SDError, match="^" + re.escape(message)) as error:
        read_infotext(f"a cat\n{line}")
    assert "\n" not in str(error.value)


def test_the_fields_of_settings_set_elsewhere_are_not_read():
    infotext = read_infotext("a cat\nSteps: many, Sampler: Magic, Schedule type: Exponential, CFG scale: 5, Size: 64x96",
                             leave_out=["steps", "sampler", "width"])
    assert infotext.settings == Settings("a cat", cfg_scale=5.0, width=64, height=96)  # Size needs width and height left out
    assert infotext.ignored == [] and infotext.fields["Steps"] == "many"


@pytest.mark.parametrize(
    "settings, message",
    [(dict(seed=-1), "seed must be between 0 and 18446744073709551615, got -1"), (dict(mask_blur=-2), "mask blur must be 0 or more"),
     (dict(seed=2**64), "seed must be between 0 and 18446744073709551615, got 18446744073709551616"),
     (dict(sampler="ddpm", karras=True), "karras sigmas need a sampler that walks noise levels")],
)
def test_settings_are_checked_when_made(settings, message):
    with pytest.raises(SDError, match=message):
        Settings("x", **settings)
