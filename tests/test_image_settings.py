"""Settings read back from images: `sd info`, and `sd generate --from IMAGE` on the demo model (64x64, 3 steps).

The infotexts of other tools are written by hand from the format rules (tests/test_settings.py), stored the way
each tool stores them: a PNG text chunk (tEXt or iTXt), a JPEG's or WebP's EXIF UserComment in UTF-16.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import cli
from sd import Settings
from sd.files.metadata import EXIF_IFD, USER_COMMENT

A1111 = (
    "a red circle on the left,\nsmall\n"
    "Negative prompt: blurry, text: watermark\n"
    "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 77, Size: 64x64, "
    'Model hash: 0123456789, Model: someone-elses, Clip skip: 2, Lora hashes: "detail: 7c6bad76eb54", Version: v1.10.1'
)
DEMO = ["--checkpoint", "demo", "--steps", "3"]


pytestmark = pytest.mark.usefixtures("command_environment")


def sd(*args):
    return CliRunner().invoke(cli.main, list(map(str, args)), prog_name="sd")


def png_with(path: str, **texts) -> Path:
    metadata = PngInfo()
    for key, value in texts.items():
        metadata.add_itxt(key, value) if key == "parameters" else metadata.add_text(key, value)
    Image.new("RGB", (64, 64)).save(path, pnginfo=metadata)
    return Path(path)


def exif_image(path: str, text: str) -> Path:
    exif = Image.Exif()
    exif[EXIF_IFD] = {USER_COMMENT: b"UNICODE\0" + text.encode("utf-16-be")}  # as A1111 writes it, through piexif
    Image.new("RGB", (64, 64)).save(path, exif=exif)
    return Path(path)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_info_prints_the_settings_text_and_json_for_scripts():
    png_with("a.png", parameters=A1111)
    result = sd("info", "a.png")
    assert result.exit_code == 0 and result.stdout == A1111 + "\n"
    described, = json.loads(sd("info", "--json", "a.png").stdout)
    assert described["prompt"] == "a red circle on the left,\nsmall" and described["negative_prompt"] == "blurry, text: watermark"
    assert described["fields"]["Lora hashes"] == "detail: 7c6bad76eb54" and described["fields"]["Version"] == "v1.10.1"
    assert described["settings"] == {
        "prompt": "a red circle on the left,\nsmall", "negative_prompt": "blurry, text: watermark", "steps": 3,
        "sampler": "dpmpp_2m", "karras": True, "cfg_scale": 6.5, "seed": 77, "width": 64, "height": 64, "strength": None,
        "eta": 0.0, "mask_blur": None, "clip_skip": 2, "emphasis": "original", "inpainted": False,
        "model_hash": "0123456789", "model": "someone-elses", "ti_hashes": {}, "lora_hashes": {"detail": "7c6bad76eb54"},
        "vae_hash": None, "vae": None, "controlnets": [],
        "hires_scale": None, "hires_width": None, "hires_height": None, "hires_upscaler": "latent", "hires_steps": 0,
        "hires_strength": 0.7, "hires_sampler": None, "hires_karras": False,
    }
    assert described["ignored"] == []


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_exif_user_comment_reads_as_the_png_chunk(suffix):
    png_with("a.png", parameters=A1111)
    exif_image(f"a{suffix}", A1111)
    from_png, = json.loads(sd("info", "--json", "a.png").stdout)
    from_exif, = json.loads(sd("info", "--json", f"a{suffix}").stdout)
    assert {**from_exif, "file": "a.png"} == from_png


def test_info_of_settings_sd_cannot_render_still_shows_them():
    png_with("sde.png", parameters="a cat\nSteps: 20, Sampler: DPM++ SDE Karras, CFG scale: 7, Seed: 1, Size: 512x512")
    result = sd("info", "sde.png")
    assert result.exit_code == 0 and result.stdout.startswith("a cat\nSteps: 20, Sampler: DPM++ SDE Karras")
    assert "note: sd cannot render these settings: the image's sampler 'DPM++ SDE Karras' is not one sd has" in result.stderr


def bad_images() -> dict[str, tuple[Path, int, str]]:
    """Files whose settings cannot be read -> (path, exit code, what the error says)."""
    Path("notes.png").write_text("not an image")
    Image.new("RGB", (64, 64)).save("plain.png")
    return {
        "not an image": (Path("notes.png"), 2, "notes.png is not an image this program can read"),
        "no settings": (Path("plain.png"), 1, "no settings found in plain.png"),
        "ComfyUI": (png_with("comfy.png", prompt='{"3": {}}', workflow='{"nodes": []}'), 2, "comfy.png holds a ComfyUI workflow, not A1111's settings text"),
        "JSON parameters": (png_with("fooocus.png", parameters='{"Prompt": "a cat"}'), 2, "fooocus.png holds its settings as JSON"),
        "no fields line": (png_with("prose.png", parameters="just a caption"), 2, "the settings text has no line of fields"),
    }


def test_info_of_images_without_readable_settings():
    for name, (path, exit_code, message) in bad_images().items():
        result = sd("info", path)
        assert result.exit_code == exit_code, name
        assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1, name
        assert "Traceback" not in result.output
    # several images: each is reported, the exit code is the worst
    result = sd("info", "plain.png", "notes.png", png_with("a.png", parameters=A1111))
    assert result.exit_code == 2 and result.stdout.startswith("a.png:\n" + A1111)
    assert result.stderr.count("error: ") == 2


def test_generate_from_a_bad_image_writes_nothing():
    cases = {**bad_images(), "Steps: many": (png_with("many.png", parameters="a cat\nSteps: many, Sampler: Euler"), 2,
                                              "--from many.png: Steps: 'many' in the image's settings is not a whole number")}
    cases["unknown sampler"] = (png_with("sde.png", parameters="a cat\nSteps: 3, Sampler: DPM++ SDE Karras"), 2,
                                "--from sde.png: the image's sampler 'DPM++ SDE Karras' is not one sd has: it has DDPM, DDIM, PLMS, LMS, Euler, Euler a, Heun, DPM++ 2M, UniPC")
    before = sorted(Path().rglob("*"))
    for name, (path, exit_code, message) in cases.items():
        result = sd("generate", "--from", path, "--checkpoint", "demo")
        assert result.exit_code == exit_code, (name, result.output)
        assert message in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.output, name
    assert sorted(Path().rglob("*")) == before


def test_generate_from_our_own_image_gives_the_same_pixels(caplog):
    assert sd("generate", "--prompt", "a blue square at the top", "--negative-prompt", "red, green: 2", "--seed", 5,
              "--output", "first.png", *DEMO).exit_code == 0
    result = sd("generate", "--from", "first.png", "--checkpoint", "demo", "--output", "again.png")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr  # same model, nothing ignored
    assert np.array_equal(pixels("again.png"), pixels("first.png"))
    assert Image.open("again.png").text["parameters"] == Image.open("first.png").text["parameters"]

    # an option given overrides the image's: the same pixels as a direct render with it
    assert sd("generate", "--from", "first.png", "--seed", 9, "--checkpoint", "demo", "--output", "seed9.png").exit_code == 0
    assert sd("generate", "--prompt", "a blue square at the top", "--negative-prompt", "red, green: 2", "--seed", 9,
              "--output", "direct9.png", *DEMO).exit_code == 0
    assert np.array_equal(pixels("seed9.png"), pixels("direct9.png"))
    assert not np.array_equal(pixels("seed9.png"), pixels("first.png"))
    settings = Settings.from_infotext(Image.open("seed9.png").text["parameters"])
    assert (settings.seed, settings.steps, settings.negative_prompt) == (9, 3, "red, green: 2")


def test_generate_from_an_a1111_image_warns_of_the_model_and_of_the_lora_it_lacks():
    png_with("a1111.png", parameters=A1111)
    result = sd("generate", "--from", "a1111.png", "--checkpoint", "demo", "--output", "out.png")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, result.stderr
    assert warnings[0].startswith("warning: a1111.png was made with model hash 0123456789 (someone-elses), not this checkpoint's")
    assert warnings[1].startswith("warning: a1111.png was made with the LoRA detail (7c6bad76eb54), which is not in ")
    written = Settings.from_infotext(Image.open("out.png").text["parameters"])
    assert written == Settings("a red circle on the left,\nsmall", "blurry, text: watermark", steps=3, sampler="dpmpp_2m", karras=True,
                               cfg_scale=6.5, seed=77, width=64, height=64, model_hash=written.model_hash, model="sd-demo",
                               clip_skip=2)
    # a sampler sd does not have is no obstacle when the command line names one
    png_with("sde.png", parameters="a cat\nSteps: 3, Sampler: DPM++ SDE Karras, Seed: 1, Size: 64x64")
    result = sd("generate", "--from", "sde.png", "--sampler", "euler", "--checkpoint", "demo", "--output", "euler.png")
    assert result.exit_code == 0, result.output
    assert "Sampler: Euler, " in Image.open("euler.png").text["parameters"]


def test_generate_from_an_image_to_image_render_needs_the_input():
    png_with("i2i.png", parameters="a red circle on the left\nSteps: 3, Sampler: Euler, Seed: 1, Size: 64x64, Denoising strength: 0.5, Mask blur: 4")
    result = sd("generate", "--from", "i2i.png", "--checkpoint", "demo", "--output", "t2i.png")
    assert result.exit_code == 0, result.output
    assert "warning: ignored from i2i.png: Denoising strength, Mask blur (without --input)\n" in result.stderr
    assert "Denoising strength" not in Image.open("t2i.png").text["parameters"]

    Image.new("RGB", (64, 64), (0, 0, 255)).save("input.png")
    result = sd("generate", "--from", "i2i.png", "--input", "input.png", "--checkpoint", "demo", "--output", "redrawn.png")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
    assert ", Denoising strength: 0.5" in Image.open("redrawn.png").text["parameters"]
