"""Memory: a render that cannot fit is refused before anything loads, with the largest size that would fit; a
decode that alone would not fit is tiled, saying so; running out of memory during a render is one line, and a
batch keeps the images it finished. The machine's free memory is set by the tests (sd.memory.free_bytes), so
they mean the same on every machine; the renders use the demo model (seconds)."""

import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import cli
from sd import generate, load_models, memory
from sd.models.decoder import Decoder
from sd.errors import SDError
from sd.memory import GIB, Render, largest_fitting, out_of_memory_as_error, plan_vae_tiling
from sd.pipeline import DEMO_CHECKPOINT

CPU = torch.device("cpu")


def fp32_render(side: int, batch: int = 1) -> Render:
    return Render(side, side, batch, True, torch.float32)


@pytest.fixture
def free(monkeypatch):
    """Sets the free memory the estimates compare with, in GiB."""

    def set_free(gib: float):
        monkeypatch.setattr(memory, "free_bytes", lambda device: int(gib * GIB))

    return set_free


def test_sizes_that_fit_decode_at_once_and_larger_ones_in_tiles(free, caplog):
    free(16)
    with caplog.at_level(logging.WARNING, logger="sd"):
        assert plan_vae_tiling(fp32_render(512), CPU, torch.float32, None) is False
        assert caplog.text == ""
        # 3072x3072: the U-Net fits (1.3 + 7.0 GiB) but a whole-image decode (3400 bytes a pixel: 30 GiB) does not
        assert plan_vae_tiling(fp32_render(3072), CPU, torch.float32, None) is True
    assert "decoding 3072x3072 at once needs about" in caplog.text and "the VAE works in tiles (--vae-tiling)" in caplog.text
    # asked for, either way, as long as it fits tiled
    assert plan_vae_tiling(fp32_render(512), CPU, torch.float32, True) is True
    assert plan_vae_tiling(fp32_render(3072), CPU, torch.float32, False) is False


def test_a_render_that_cannot_fit_is_refused_with_the_largest_size_that_would(free):
    free(16)
    with pytest.raises(SDError) as refused:
        plan_vae_tiling(Render(100000, 50000, 1, True, torch.float32), CPU, torch.float32, None)
    message = str(refused.value)
    assert "100000x50000 needs about" in message and "this machine has 16.0 GiB free" in message
    width, height = (int(side) for side in message.split("fits is ")[1].split(" ")[0].split("x"))
    assert abs(width - 2 * height) <= 8 and width % 8 == height % 8 == 0  # the same shape, to a multiple of 8
    # it fits, and the next size of that shape up does not
    assert plan_vae_tiling(Render(width, height, 1, True, torch.float32), CPU, torch.float32, None) is True
    with pytest.raises(SDError):
        plan_vae_tiling(Render(width + 16, height + 8, 1, True, torch.float32), CPU, torch.float32, None)


def test_weights_already_loaded_are_not_counted_again(free):
    free(4)  # SD 1.5's U-Net and decoder take 3.4 GiB in fp32, 1.7 in bf16
    with pytest.raises(SDError):
        plan_vae_tiling(fp32_render(512), CPU, torch.float32, None)
    assert plan_vae_tiling(fp32_render(512), CPU, None, None) is False
    assert plan_vae_tiling(Render(512, 512, 1, True, torch.bfloat16), CPU, torch.bfloat16, None) is False


def test_nothing_fits_where_not_even_the_smallest_size_does():
    assert largest_fitting(fp32_render(1024), budget=0.5 * GIB) is None


def test_allocator_failures_become_one_line_errors():
    with pytest.raises(SDError, match="ran out of memory rendering 64x72: render smaller, pass --vae-tiling"):
        with out_of_memory_as_error(64, 72):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 200000000000 bytes")
    with pytest.raises(SDError, match="ran out of memory"):
        with out_of_memory_as_error(64, 72):
            raise MemoryError
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):  # other errors stay what they are
        with out_of_memory_as_error(64, 72):
            raise RuntimeError("Sizes of tensors must match")


def test_generate_refuses_before_loading(free, monkeypatch):
    free(16)
    monkeypatch.setattr("sd.pipeline.cached_models", lambda *args: pytest.fail("the models were loaded"))
    with pytest.raises(SDError, match="the largest size of that shape that fits is"):
        generate("a red circle", checkpoint=DEMO_CHECKPOINT, width=100000, height=100000, progress=False)


def test_a_batch_that_runs_out_of_memory_keeps_its_finished_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SD_CACHE_DIR", str(tmp_path / "cache"))
    decode, calls = Decoder.forward, []

    def decode_then_fail(self, latents, **options):
        calls.append(latents.shape)
        if len(calls) == 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 200000000000 bytes")
        return decode(self, latents, **options)

    monkeypatch.setattr(Decoder, "forward", decode_then_fail)
    args = ["generate", "--prompt", "a red circle on the left", "--num-images", "3", "--steps", "2", "--seed", "1",
            "--checkpoint", "demo", "--outdir", "out"]
    result = CliRunner().invoke(cli.main, args, prog_name="sd")
    assert result.exit_code == 2, result.output
    assert "error: ran out of memory rendering 64x64" in result.output and "Traceback" not in result.output
    assert [path.name for path in Path("out").iterdir()] == ["00000-1-a-red-circle-on-the-left.png"]


def test_the_tiled_decode_is_what_generate_runs_when_asked(monkeypatch):
    models = load_models(DEMO_CHECKPOINT)
    asked = []
    decode = Decoder.forward

    def record(self, latents, tiled=False, **options):
        asked.append(tiled)
        return decode(self, latents, tiled=tiled, **options)

    monkeypatch.setattr(Decoder, "forward", record)
    for vae_tiling in (True, False):
        generate("a red circle", models=models, steps=1, seed=1, vae_tiling=vae_tiling, progress=False)
    assert asked == [True, False]
