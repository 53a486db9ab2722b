"""The kernel paths chosen per CPU (sd/kernels.py): every path forced on this machine gives the reference path's
outputs within its dtype's rounding, and the timing that chooses is made once and cached."""

import json
import logging
import threading

import pytest
import torch
from click.testing import CliRunner

import cli
from sd import kernels, load_models
from sd.errors import SDError
from sd.pipeline import DEMO_CHECKPOINT
from sd.precision import cpu_has_bf16
from sd.models import winograd
from sd.models.layers import Conv2d
from test_winograd import winograd_on_every_layer

CPU = torch.device("cpu")
REFERENCE = ",".join(f"{name}={paths[0]}" for name, paths in kernels.CHOICES.items())


def demo_outputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The demo model's text encoder, U-Net and decoder on fixed inputs, loaded and run under SD_KERNELS as set.
    48x48 latents: 2,304 tokens, so that the U-Net's attention runs in three pieces per head, the last one short
    (the decoder gets a 24x24 corner: it is slow without channels_last)."""
    models = load_models(DEMO_CHECKPOINT, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 48, 48, generator=generator).to(dtype)
    tokens = torch.randint(0, 49408, (2, 77), generator=generator)
    with torch.inference_mode():
        context = models["clip"](tokens, dtype=dtype)
        noise = models["diffusion"](latents, context, torch.tensor([999, 500]))
        image = models["decoder"](latents[:1, :, :24, :24])
    return {"clip": context, "diffusion": noise, "decoder": image}


def relative_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).pow(2).mean().sqrt() / expected.float().pow(2).mean().sqrt()).item()


# Relative rms differences from the reference path. fp32: the same sums in another order (pieces of the scores, a
# convolution's or a packed weight's blocking), so rounding of about 1e-7 a value, grown through the layers:
# measured up to 2.3e-6 (the decoder) on a Zen 4. bf16: each path rounds to bf16 (2^-8 = 0.4 % of a value) at
# other points (the pieces round the scores before the softmax; a packed feed-forward rounds its gate once, not
# twice), and those roundings pass through every later layer: measured up to 0.75 % (the decoder). Winograd's
# algorithm (fp32) sums terms larger than the products: measured up to 1.8e-6 (the decoder). A wrong kernel, layout
# or scale is of order 100 %.
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(kernels.CHOICES))
def test_every_path_gives_the_reference_outputs(name, dtype, monkeypatch, tmp_path):
    """Each alternative forced here, whatever this CPU would choose, the other choices at their reference."""
    if name == "packing" and not kernels.X86_ONEDNN:
        pytest.skip("packing is for oneDNN on x86")
    if name == "packing" and dtype == torch.bfloat16 and not cpu_has_bf16():
        pytest.skip("oneDNN runs packed bf16 weights only with bf16 instructions")
    monkeypatch.setenv("SD_KERNELS_CACHE", str(tmp_path / kernels.CACHE_NAME))
    monkeypatch.setenv("SD_KERNELS", REFERENCE)
    reference = demo_outputs(dtype)
    winograd_calls = winograd_on_every_layer(monkeypatch)
    for path in kernels.CHOICES[name][1:]:
        monkeypatch.setenv("SD_KERNELS", f"{REFERENCE},{name}={path}")
        for model, output in demo_outputs(dtype).items():
            assert output.dtype == dtype and output.shape == reference[model].shape
            assert relative_rms(output, reference[model]) < TOLERANCES[dtype], (model, path)
    # Winograd's algorithm runs fp32 alone, for each 3x3 convolution of stride 1 of the U-Net and the decoder here
    runs_winograd = (name, dtype) == ("convolution", torch.float32)
    assert len(winograd_calls) == (stride_one_3x3_convolutions(dtype) if runs_winograd else 0)
    assert not (tmp_path / kernels.CACHE_NAME).exists()  # forced paths are never measured


def test_kernels_packed_at_load_leave_the_layers_winograd_takes_plain(monkeypatch):
    """Where kernels are packed at load (packing=on) and Winograd's algorithm was chosen, the 3x3 kernels it takes stay
    plain and are packed per input size where it does not run; the others are packed. Here it takes the demo U-Net's
    96-channel layers, not its 48-channel ones nor any of the decoder's (at most 48), and the outputs are the
    reference paths'."""
    if not kernels.X86_ONEDNN:
        pytest.skip("packing is for oneDNN on x86")
    monkeypatch.setenv("SD_KERNELS", REFERENCE)
    reference = demo_outputs(torch.float32)
    calls = winograd_on_every_layer(monkeypatch)
    monkeypatch.setattr(winograd, "LEAST_CHANNELS", 96)
    monkeypatch.setenv("SD_KERNELS", f"{REFERENCE},packing=on,convolution=winograd")
    models = load_models(DEMO_CHECKPOINT, dtype=torch.float32)
    layers = [layer for name in ("diffusion", "decoder") for layer in models[name].modules()
              if isinstance(layer, Conv2d) and layer.kernel_size == (3, 3)]
    taken = [layer for layer in layers if winograd.takes(layer)]
    assert taken and len(taken) < len(layers)
    for layer in layers:
        plain = layer in taken
        assert (layer.packs_per_size, layer.weight.is_mkldnn) == (plain, not plain)
    for model, output in demo_outputs(torch.float32).items():
        assert relative_rms(output, reference[model]) < TOLERANCES[torch.float32], model
    assert len(calls) == len(taken)  # each once: the U-Net's 96-channel layers


def stride_one_3x3_convolutions(dtype: torch.dtype) -> int:
    models = load_models(DEMO_CHECKPOINT, dtype=dtype)
    return sum(isinstance(layer, torch.nn.Conv2d) and layer.kernel_size == (3, 3) and layer.stride == (1, 1)
               for name in ("diffusion", "decoder") for layer in models[name].modules())


def test_forced_paths_are_read_and_bad_ones_refused(monkeypatch):
    assert kernels.forced_paths(" attention=pieces , packing=off,") == {"attention": "pieces", "packing": "off"}
    monkeypatch.setenv("SD_KERNELS", "linear=convolution")
    assert kernels.choice("linear", CPU, torch.float32) == "convolution"
    assert kernels.choice("linear", torch.device("cuda"), torch.float32) == "matmul"  # off the CPU: fixed paths
    assert kernels.choice("channels_last", torch.device("mps"), torch.float32) == "off"
    for text, problem in [("attention=fast", "unknown path 'attention=fast'"), ("tiles=on", "unknown choice 'tiles=on'"),
                          ("packing", "unknown path 'packing'")]:
        with pytest.raises(SDError, match=f"^SD_KERNELS: {problem}: use attention=sdpa\\|pieces; packing=off\\|on\\|sizes; ") as error:
            kernels.forced_paths(text)
        assert "\n" not in str(error.value)


def test_the_command_refuses_a_bad_setting_in_one_line_before_loading(command_environment, monkeypatch):
    monkeypatch.setenv("SD_KERNELS", "attention=fastest")
    result = CliRunner().invoke(cli.main, ["generate", "--prompt", "a red circle"], prog_name="sd")
    assert result.exit_code == 2 and "loaded" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: SD_KERNELS: unknown path 'attention=fastest': use attention=sdpa|pieces")


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """The choices made afresh (nothing in memory, SD_KERNELS unset) into a cache in tmp_path, with a timing of the
    attention that counts its calls and finds `pieces` twice as fast."""
    monkeypatch.setenv("SD_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SD_KERNELS_CACHE", raising=False)
    monkeypatch.delenv("SD_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_chosen", {})
    calls = []

    def attention_calls(dtype):
        calls.append(dtype)
        return {"sdpa": None, "pieces": None}

    monkeypatch.setitem(kernels.TIMED_CALLS, "attention", attention_calls)
    monkeypatch.setattr(kernels, "timed", lambda calls: ({"sdpa": [2.0], "pieces": [1.0]}, 0.95))
    return calls


def test_a_choice_is_measured_once_and_cached_by_cpu_and_torch_version(measured, monkeypatch, tmp_path):
    assert kernels.choice("attention", CPU, torch.float32) == "pieces"
    assert kernels.choice("attention", CPU, torch.float32) == "pieces" and measured == [torch.float32]  # from memory
    entries = json.loads((tmp_path / kernels.CACHE_NAME).read_text())
    [(key, entry)] = entries.items()
    assert kernels.cpu_model() in key and torch.__version__ in key and "float32" in key
    assert entry["attention"]["path"] == "pieces" and set(entry["attention"]["seconds"]) == {"sdpa", "pieces"}
    monkeypatch.setattr(kernels, "_chosen", {})  # a new process: read back from the file
    assert kernels.choice("attention", CPU, torch.float32) == "pieces" and measured == [torch.float32]
    monkeypatch.setattr(kernels, "_chosen", {})
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # another torch: measured again, beside the first entry
    assert kernels.choice("attention", CPU, torch.float32) == "pieces" and len(measured) == 2
    assert len(json.loads((tmp_path / kernels.CACHE_NAME).read_text())) == 2
    monkeypatch.setattr(kernels, "_chosen", {})
    monkeypatch.setenv("SD_KERNELS_CACHE", str(tmp_path / "elsewhere.json"))  # another file: timed again, kept there
    assert kernels.choice("attention", CPU, torch.float32) == "pieces" and len(measured) == 3
    assert len(json.loads((tmp_path / "elsewhere.json").read_text())) == 1


def test_an_alternative_must_beat_the_reference_by_the_margin(measured, monkeypatch):
    monkeypatch.setattr(kernels, "timed", lambda calls: ({"sdpa": [1.0], "pieces": [1 - kernels.MARGIN / 2]}, 0.95))
    assert kernels.choice("attention", CPU, torch.float32) == "sdpa"


@pytest.mark.parametrize("slower", [0.9 * kernels.SLOWER_AT_MOST, 1.1 * kernels.SLOWER_AT_MOST])
def test_an_alternative_much_slower_at_one_image_size_is_not_chosen(measured, monkeypatch, slower):
    """Twice as fast in all, but each image size timed counts: packed kernels ran some 3-40x slower with AVX2."""
    monkeypatch.setattr(kernels, "timed", lambda calls: ({"sdpa": [1.0, 0.1], "pieces": [0.4, 0.1 * slower]}, 0.95))
    assert kernels.choice("attention", CPU, torch.float32) == ("pieces" if slower <= kernels.SLOWER_AT_MOST else "sdpa")


# packing's seconds: a 512x512 step's part, then another image size
@pytest.mark.parametrize("seconds, chosen", [
    ({"off": [1.0, 0.1], "on": [0.8, 0.1], "sizes": [0.79, 0.1]}, "on"),  # sizes level with on: on, which packs once
    ({"off": [1.0, 0.1], "on": [0.8, 0.1], "sizes": [0.7, 0.1]}, "sizes"),  # sizes beats on by the margin
    ({"off": [1.0, 0.1], "on": [0.7, 1.0], "sizes": [0.8, 0.02]}, "sizes"),  # on 10x slower at the other size (AVX2)
    ({"off": [1.0, 0.1], "on": [0.99, 0.1], "sizes": [0.98, 0.1]}, "off"),  # neither beats off by the margin
    ({"off": [1.0, 0.1], "on": [0.7, 0.1], "sizes": [0.5, 0.2]}, "on"),  # sizes 2x slower than off at the other size
])
def test_a_later_path_must_beat_the_one_chosen_before_it_by_the_margin_too(seconds, chosen):
    assert kernels.fastest_that_pays(seconds, kernels.CHOICES["packing"]) == chosen


def test_a_timing_made_while_the_cpu_was_busy_is_named_in_a_warning_and_kept(measured, monkeypatch, tmp_path, caplog):
    """Kept all the same: processes sharing the cache must run the same paths, to make the same images."""
    monkeypatch.setattr(kernels, "timed", lambda calls: ({"sdpa": [2.0], "pieces": [1.0]}, 0.49))
    with caplog.at_level(logging.WARNING, logger="sd"):
        assert kernels.choice("attention", CPU, torch.float32) == "pieces"
    assert "other work kept the CPU busy while sd timed its attention kernels (49 % of" in caplog.text
    assert f"delete {tmp_path / kernels.CACHE_NAME} to time them again" in caplog.text
    [entry] = json.loads((tmp_path / kernels.CACHE_NAME).read_text()).values()
    assert entry["attention"]["cpu_share"] == 0.49


def test_a_process_waits_for_another_timing_the_same_choice_and_takes_its_path(measured, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    lock = open(tmp_path / f"{kernels.CACHE_NAME}.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # as another process timing the attention holds it
    chosen = []
    waiting = threading.Thread(target=lambda: chosen.append(kernels.choice("attention", CPU, torch.float32)))
    waiting.start()
    waiting.join(0.5)
    assert waiting.is_alive()
    (tmp_path / kernels.CACHE_NAME).write_text(json.dumps({kernels.cache_key(torch.float32): {"attention": {"path": "sdpa"}}}))
    fcntl.flock(lock, fcntl.LOCK_UN)
    waiting.join()
    lock.close()
    assert chosen == ["sdpa"] and not measured


def test_capability_decides_without_measuring(measured, monkeypatch):
    """Where bf16 computes in fp32 (no bf16 instructions) bf16 gets the reference paths; so does fp16."""
    monkeypatch.setattr(kernels, "cpu_has_bf16", lambda: False)
    assert kernels.choice("attention", CPU, torch.bfloat16) == "sdpa"
    assert kernels.choice("packing", CPU, torch.bfloat16) == "off"
    assert kernels.choice("attention", CPU, torch.float16) == "sdpa" and not measured
    assert kernels.choice("convolution", CPU, torch.bfloat16) == "direct" and not measured  # Winograd: fp32 alone
    monkeypatch.setattr(kernels, "X86_ONEDNN", False)
    assert kernels.choice("packing", CPU, torch.float32) == "off" and not measured  # packing is oneDNN's, on x86


@pytest.mark.parametrize("packing", ["off", "on", "sizes"])
def test_winograd_is_timed_whatever_the_packing(packing, measured, monkeypatch):
    """fp32's convolution is measured against each packing: where kernels are packed at load (`on`), those that
    Winograd's algorithm takes are then left plain (test_kernels_packed_at_load_leave_the_layers_winograd_takes_plain)."""
    timed = []
    monkeypatch.setenv("SD_KERNELS", f"packing={packing},channels_last=on")
    monkeypatch.setitem(kernels.TIMED_CALLS, "convolution", lambda dtype: timed.append(dtype) or {"direct": None, "winograd": None})
    monkeypatch.setattr(kernels, "timed", lambda calls: ({"direct": [2.0], "winograd": [1.0]}, 0.95))
    assert kernels.choice("convolution", CPU, torch.float32) == "winograd" and timed == [torch.float32]


def test_a_damaged_or_unwritable_cache_is_ignored_with_a_warning(measured, monkeypatch, tmp_path, caplog):
    (tmp_path / kernels.CACHE_NAME).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="sd"):
        assert kernels.choice("attention", CPU, torch.float32) == "pieces"
    assert "ignoring the kernel choices cached in" in caplog.text
    assert json.loads((tmp_path / kernels.CACHE_NAME).read_text())  # written afresh
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("SD_CACHE_DIR", str(blocked / "sd"))  # a folder that cannot be made
    monkeypatch.setattr(kernels, "_chosen", {})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sd"):
        assert kernels.choice("attention", CPU, torch.float32) == "pieces"
    assert "could not cache the kernel choice" in caplog.text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_real_timing_chooses_every_path(dtype, monkeypatch, tmp_path):
    """Every choice left open for the dtype timed on SD 1.5's shapes and cached (bf16 times the packing)."""
    if dtype == torch.bfloat16 and not cpu_has_bf16():
        pytest.skip("bf16 computes in fp32 on this CPU: nothing to time")
    monkeypatch.setenv("SD_KERNELS_CACHE", str(tmp_path / kernels.CACHE_NAME))
    monkeypatch.delenv("SD_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_chosen", {})
    chosen = kernels.choose_all(dtype)
    assert all(chosen[name] in paths for name, paths in kernels.CHOICES.items())
    [entry] = json.loads((tmp_path / kernels.CACHE_NAME).read_text()).values()
    timed = [name for name in kernels.CHOICES if len(kernels.candidates(name, dtype)) > 1]
    assert {name: entry[name]["path"] for name in entry} == {name: chosen[name] for name in timed}
