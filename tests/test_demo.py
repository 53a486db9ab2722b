"""The built-in demo model: its drawn world, its training code, and its real outputs judged by rules.

The outputs are judged on the shipped data/sd-demo.safetensors in fp32 (the same numbers on every CPU kind),
each against a control that differs only in what is tested: the same starting noise with another caption,
the same input image at another strength, the same batch without guidance.
"""

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import unpacked_state_dict
from PIL import Image

from sd import generate, load_models
from sd.models.unet import UNetConfig
from sd.pipeline import DEFAULT_CHECKPOINTS, DEMO_CHECKPOINT
from sd.models.clip import CLIPConfig
from sd.training import train as training
from sd.sampling.schedule import SD15
from sd.settings import COMMAND_DEFAULTS
from sd.training.evaluate import accuracy, render_all
from sd.training.world import HELD_OUT, Reading, Scene, combinations, random_batch, read_image
from sd.models.vae import VAEConfig

IMAGES = Path(__file__).resolve().parent.parent / "images"
SD_SCRIPT = shutil.which("sd", path=str(Path(sys.executable).parent)) or shutil.which("sd")


def reading(image: Image.Image):
    return read_image(np.asarray(image))


def example(name: str) -> Image.Image:
    """The README's example inputs: a blue square on the left of a white image, and a mask around it."""
    with Image.open(IMAGES / name) as image:
        return image.copy()


# The world and its rules


def test_the_rules_read_every_drawn_image_right():
    images, captions = random_batch(400, torch.Generator().manual_seed(1))
    for pixels, caption in zip(images, captions):
        found = reading(Image.fromarray(((pixels + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()))
        words = caption.replace(",", " ").replace(":", " ").split()
        assert {found.colour, found.shape, found.position} <= set(words), caption


def softly_drawn(inside) -> np.ndarray:
    """A red shape on gray as the model draws them: given by `inside(x, y)` over [-1, 1] (a 24-pixel box on the
    left), its edges blurred over 3 pixels."""
    axis = (np.arange(64) + 0.5 - 18) / 12
    x, y = np.meshgrid(axis, (np.arange(64) + 0.5 - 32) / 12)
    cover = inside(x, y).astype(np.float32)
    cover = sum(np.roll(np.roll(cover, i, 0), j, 1) for i in (-1, 0, 1) for j in (-1, 0, 1)) / 9  # a 3x3 box blur
    colour, gray = np.array([220, 40, 40]), np.array([128, 128, 128])
    return (gray + (colour - gray) * cover[..., None]).round().astype(np.uint8)


@pytest.mark.parametrize("shape, inside", [
    ("square", lambda x, y: (np.abs(x) <= 1 - 0.12 * (1 - y**2)) & (np.abs(y) <= 1 - 0.12 * (1 - x**2))),  # sides bowed in
    ("circle", lambda x, y: x**2 + 1.1 * y**2 <= 1),  # a little flattened
    ("triangle", lambda x, y: (y >= -1) & (y <= 0.85) & (np.abs(x) <= (y + 1) / 2)),  # its base cut off
])
def test_the_rules_read_shapes_drawn_imperfectly(shape, inside):
    """The model's squares have wavy sides, which leave them filling 0.8 of their box, as circles do: the corners
    tell them apart."""
    assert read_image(softly_drawn(inside)) == Reading("red", shape, "left")


def test_held_out_combinations_never_appear_in_training():
    _, captions = random_batch(3000, torch.Generator().manual_seed(2))
    for colour, shape in HELD_OUT:
        assert not any(colour in caption and shape in caption for caption in captions)
    assert len(combinations(False)) + len(combinations(True)) == 6 * 3 * 4


def test_an_empty_image_has_no_object():
    assert reading(Image.new("RGB", (64, 64), "gray")).colour is None


# Training


TINY = training.TrainingConfig(
    unet=UNetConfig(base_width=16, width_multipliers=(1, 2), attention_levels=(1,), blocks_per_level=1, num_heads=2,
                    context_width=32, num_groups=8, sample_size=8),
    vae=VAEConfig(base_width=8, width_multipliers=(1, 1, 1, 1), blocks_per_level=1, num_groups=4),
    clip=CLIPConfig(width=32, num_layers=1, num_heads=2),
    vae_steps=40, vae_batch=4, unet_cycles=(training.Cycle(40, 8e-4, 5, 5.0), training.Cycle(10, 4e-4, 2, None)), unet_batch=8,
    latent_bank=64, warmup_steps=5, save_every=10,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A whole run of TINY: its training state and its checkpoint, which the tests below only read."""
    folder = tmp_path_factory.mktemp("trained")
    output = training.train(TINY, folder / "state.pt", folder / "tiny.safetensors", progress=False)
    return folder / "state.pt", output


def test_training_lowers_the_loss_and_writes_a_checkpoint_load_models_reads(trained):
    state, output = trained
    losses = torch.load(state, weights_only=True)["losses"]
    assert losses[-10:].mean() < 0.9 * losses[:10].mean()
    models = load_models(output)
    assert models["diffusion"].config == TINY.unet
    assert models["clip"].config.vocab_size == len(training.text_token_ids()) < 100
    image, = generate("a red circle on the left", models=models, steps=2, seed=0, progress=False)
    assert image.size == (64, 64)


def test_a_stopped_run_resumes_where_it_was_saved(trained, tmp_path, monkeypatch):
    """Stopped in the U-Net stage between two saves, then run again: the same weights as a run never stopped."""
    _, whole = trained
    original_update = training.update_ema

    def stop_at_step_25(run):
        if run.step == 25:
            raise KeyboardInterrupt
        original_update(run)

    monkeypatch.setattr(training, "update_ema", stop_at_step_25)
    with pytest.raises(KeyboardInterrupt):
        training.train(TINY, tmp_path / "stopped.pt", tmp_path / "stopped.safetensors", progress=False)
    assert torch.load(tmp_path / "stopped.pt", weights_only=True)["step"] == 20
    monkeypatch.setattr(training, "update_ema", original_update)
    resumed = training.train(TINY, tmp_path / "stopped.pt", tmp_path / "stopped.safetensors", progress=False)
    for name, model in load_models(whole).items():
        again = unpacked_state_dict(load_models(resumed)[name])
        for key, value in unpacked_state_dict(model).items():
            torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=f"{name}.{key}")


def test_the_u_net_stage_runs_its_cycles_in_turn():
    """Each cycle warms up to its own peak and decays to a tenth of it; the loss weights are capped where it says."""
    cycles = (training.Cycle(10, 8e-4, 2, 5.0), training.Cycle(12, 4e-4, 3, None))
    run = training.Run(TINY, optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0))
    rates = []
    for step in range(22):
        cycle, within = training.cycle_at(cycles, step)
        training.set_learning_rate(run, within, cycle.peak, cycle.steps, cycle.warmup)
        rates.append(run.optimizer.param_groups[0]["lr"])
    assert rates[0] == pytest.approx(4e-4) and rates[1] == pytest.approx(8e-4) and 8e-5 < rates[9] < 1.5 * 8e-5
    assert rates[10] == pytest.approx(4e-4 / 3) and rates[12] == pytest.approx(4e-4) and 4e-5 < rates[21] < 1.5 * 4e-5
    assert rates[1:10] == sorted(rates[1:10], reverse=True) and rates[12:] == sorted(rates[12:], reverse=True)
    assert training.cycle_at(cycles, 10) == (cycles[1], 0)
    with pytest.raises(ValueError):
        training.cycle_at(cycles, 22)
    late = torch.tensor([999, 100])
    uncapped = training.loss_weights(late, SD15.alphas_cumprod, "v")
    assert uncapped[0] > 200 and training.loss_weights(late, SD15.alphas_cumprod, "v", 5.0).tolist() == [5.0, pytest.approx(float(uncapped[1]))]


def test_a_run_with_other_settings_is_not_resumed(trained):
    state, _ = trained
    with pytest.raises(SystemExit, match="holds a run with other settings"):
        training.resume(dataclasses.replace(TINY, seed=1), state)


# The shipped model's real outputs


@pytest.fixture(scope="module")
def demo():
    assert DEMO_CHECKPOINT.stat().st_size <= 10 * 2**20
    return load_models(DEMO_CHECKPOINT)


@pytest.mark.parametrize("scene, other_position", [
    (Scene("red", "circle", "left"), "right"),
    (Scene("blue", "square", "top"), "bottom"),
])
def test_colour_and_position_follow_the_prompt(demo, scene, other_position):
    """Four seeds; the control is the same seeds with the other position, so the noise cannot be what places it."""
    moved = dataclasses.replace(scene, position=other_position)
    for wanted in (scene, moved):
        images = generate(wanted.caption(), models=demo, seed=3, num_images=4, progress=False, **COMMAND_DEFAULTS)
        readings = [reading(image) for image in images]
        assert [(r.colour, r.position) for r in readings] == [(wanted.colour, wanted.position)] * 4, wanted.caption()


def test_image_to_image_keeps_the_input_at_low_strength_and_follows_the_prompt_at_full(demo):
    source = example("blue-square.png")
    assert reading(source) == Reading("blue", "square", "left")
    prompt = Scene("yellow", "circle", "right").caption()
    kept = generate(prompt, models=demo, input_image=source, strength=0.3, seed=5, num_images=2, progress=False, **COMMAND_DEFAULTS)
    redrawn = generate(prompt, models=demo, input_image=source, strength=1.0, seed=5, num_images=2, progress=False, **COMMAND_DEFAULTS)
    assert [reading(image) for image in kept] == [Reading("blue", "square", "left")] * 2
    assert [reading(image) for image in redrawn] == [Reading("yellow", "circle", "right")] * 2


def test_inpainting_recolours_the_masked_object_and_nothing_else(demo):
    source, mask = example("blue-square.png"), example("blue-square-mask.png")
    assert np.asarray(mask)[16:48, 2:36].all() and np.asarray(mask).sum() == 255 * 32 * 34  # the box around the square
    for colour in ("yellow", "blue"):  # "blue" is the control: the same repaint keeps the colour asked for
        image, = generate(f"a {colour} square on the left", models=demo, input_image=source, mask=mask, strength=1.0, seed=7, progress=False,
                          **COMMAND_DEFAULTS)
        inside = np.asarray(image)[16:48, 2:36]
        assert read_image(np.pad(inside, ((4, 4), (4, 4), (0, 0)), constant_values=255)).colour == colour
        outside = np.ones((64, 64), bool)
        outside[16 - 12 : 48 + 12, 0 : 36 + 12] = False  # beyond the mask and the 3 radii of its feathered edge
        assert np.array_equal(np.asarray(image)[outside], np.asarray(source)[outside])


def test_guidance_makes_the_images_follow_the_prompt(demo):
    """The unguided images, the control, are rendered only once the guided ones reach the target (each render
    depends on its caption, CFG and seed alone)."""
    guided = accuracy(render_all(demo, (7.5,), images_per_caption=1, seed=11, **COMMAND_DEFAULTS))["all three"]
    assert guided >= 90, guided
    unguided = accuracy(render_all(demo, (1.0,), images_per_caption=1, seed=11, **COMMAND_DEFAULTS))["all three"]
    assert guided > unguided + 10, (guided, unguided)


def test_unknown_words_are_named_in_one_warning(demo, caplog):
    generate("a red circle on the left next to a cat", models=demo, steps=2, seed=0, progress=False)
    warning, = [record.getMessage() for record in caplog.records if "does not know" in record.getMessage()]
    assert set(warning.split(": ")[1].split(", ")) == {"next", "to", "cat"}


# Out of the box


def test_the_readme_command_renders_with_the_demo_model_when_no_checkpoint_is_there(tmp_path, monkeypatch):
    if any(path.is_file() for path in DEFAULT_CHECKPOINTS):
        pytest.skip("an SD 1.5 checkpoint in data/ takes the demo model's place")
    monkeypatch.delenv("SD_CHECKPOINT", raising=False)
    result = subprocess.run([SD_SCRIPT, "generate", "--prompt", "a red circle on the left", "--seed", "1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "using the built-in demo model" in result.stderr
    written, = (tmp_path / "outputs").glob("*.png")
    image = Image.open(written)
    assert image.size == (64, 64)
    assert "Model: sd-demo" in image.text["parameters"]
