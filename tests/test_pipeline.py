"""generate() end to end on a random full-size checkpoint, at 64x64 with a few steps."""

import numpy as np
import pytest
import torch
from PIL import Image

from sd import SDError, generate
from sd import memory, pipeline

SMALL = dict(width=64, height=64, steps=2, progress=False)


@pytest.fixture
def unet_calls(models):
    """Records the batch size of every U-Net call."""
    batches = []
    handle = models["diffusion"].register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    yield batches
    handle.remove()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_text_to_image_is_reproducible_per_seed(models, unet_calls):
    first = generate("a red apple", seed=7, models=models, **SMALL)
    again = generate("a red apple", seed=7, models=models, **SMALL)
    other = generate("a red apple", seed=8, models=models, **SMALL)
    assert len(first) == 1 and first[0].size == (64, 64) and first[0].mode == "RGB"
    assert np.array_equal(pixels(first[0]), pixels(again[0]))
    assert np.abs(pixels(first[0]) - pixels(other[0])).max() > 10
    # Guidance: one U-Net call per step, with the unconditional and conditional halves batched.
    assert unet_calls == [2] * 6
    assert first[0].info["sd"].seed == 7


def test_guidance_off_makes_one_unguided_call_per_step(models, unet_calls):
    generate("a red apple", seed=7, cfg_scale=1.0, models=models, **SMALL)
    assert unet_calls == [1, 1]


def test_image_to_image_runs_the_strength_share_of_steps(models, unet_calls):
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8))
    images = generate("a blue house", input_image=source, strength=0.5, num_images=2, seed=3, models=models, **{**SMALL, "steps": 4})
    again = generate("a blue house", input_image=source, strength=0.5, num_images=2, seed=3, models=models, **{**SMALL, "steps": 4})
    assert [image.size for image in images] == [(64, 64)] * 2
    assert unet_calls == [4, 4] * 2  # half of 4 steps, 2 images guided
    assert np.array_equal(pixels(images[0]), pixels(again[0]))
    # The two images of a batch get different noise.
    assert np.abs(pixels(images[0]) - pixels(images[1])).max() > 10
    assert images[0].info["sd"].strength == 0.5


def test_tiny_strength_still_runs_one_step(models, unet_calls, tmp_path):
    source = tmp_path / "source.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(source)
    generate("a red square", input_image=source, strength=0.05, seed=1, models=models, **{**SMALL, "steps": 20})
    assert unet_calls == [2]


def test_negative_prompt_changes_the_image(models):
    plain = generate("a dog", seed=5, models=models, **SMALL)
    negative = generate("a dog", negative_prompt="blurry", seed=5, models=models, **SMALL)
    assert np.abs(pixels(plain[0]) - pixels(negative[0])).max() > 0


def test_latents_must_fit_the_size(models):
    with pytest.raises(SDError, match=r"latents have shape \(1, 4, 4, 4\)"):
        generate("x", latents=torch.zeros(1, 4, 4, 4), models=models, **SMALL)


def test_checkpoint_is_loaded_once_and_reused(safetensors_checkpoint, monkeypatch):
    loads = []
    real_load = pipeline.load_models
    monkeypatch.setattr(pipeline, "load_models", lambda *args, **kwargs: loads.append(args) or real_load(*args, **kwargs))
    monkeypatch.setattr(pipeline, "_loaded", {})
    for prompt in ("one", "two"):
        generate(prompt, checkpoint=safetensors_checkpoint, device="cpu", seed=1, **{**SMALL, "steps": 1})
    assert len(loads) == 1


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(strength=0), "strength must be in"),
        (dict(strength=1.5), "strength must be in"),
        (dict(width=100), "width must be a multiple of 8 and at least 64, got 100: try 96"),
        (dict(height=32), "height must be a multiple of 8 and at least 64"),
        (dict(steps=0), "steps must be between 1 and 999, got 0"),
        (dict(steps=1000), "steps must be between 1 and 999, got 1000"),
        (dict(sampler="ddim", karras=True), "karras sigmas need a sampler that walks noise levels"),
        (dict(sampler="euler", eta=0.5), "eta applies to the ddim sampler only"),
        (dict(cfg_scale=-1), "cfg scale must be a number of 0 or more, got -1"),
        (dict(cfg_scale=float("nan")), "cfg scale must be a number of 0 or more, got nan"),
        (dict(cfg_scale=float("inf")), "cfg scale must be a number of 0 or more, got inf"),
        (dict(sampler="magic"), "unknown sampler 'magic'"),
        (dict(num_images=0), "number of images must be at least 1"),
        (dict(device="tpu"), "unknown device"),
        (dict(device="cuda"), "device cuda is not available"),
        (dict(checkpoint="/nowhere/model.safetensors"), "checkpoint not found: /nowhere/model.safetensors; get SD 1.5"),
    ],
)
def test_bad_settings_are_refused_before_any_work(settings, message):
    if settings.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SDError, match=message):
        generate("x", **settings)


def test_unreadable_input_image_is_refused(models, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    with pytest.raises(SDError, match="^input image .*notes.png is not an image this program can read: give a PNG, JPEG or WebP file$"):
        generate("x", input_image=not_image, models=models, **SMALL)


def test_idle_device_receives_each_model_after_its_stage():
    model = torch.nn.Linear(2, 2)
    with memory.on_device(model, torch.device("cpu"), idle_device="meta") as active:
        assert active.weight.device.type == "cpu"
    assert model.weight.device.type == "meta"


def test_unet_without_loras_stays_where_it_is():
    # a render without LoRAs must not move the U-Net before its stage: with an idle device that would be a
    # needless copy of the whole U-Net
    unet = torch.nn.Linear(2, 2, device="meta")
    stages = pipeline.Stages({"diffusion": unet}, torch.device("cpu"), "cpu", torch.float32, torch.float32, False)
    with pipeline.unet_with_loras(stages, {}):
        assert unet.weight.device.type == "meta"
