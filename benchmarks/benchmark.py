"""sd against diffusers on the same random full-size SD 1.5 weights, each measurement in a fresh process.

    make bench                                               # everything below, fp32 and bf16
    .venv/bin/python benchmarks/benchmark.py --only load     # groups: load, components, turns, generate
    .venv/bin/python benchmarks/benchmark.py --sizes 256 --steps 4 --dtypes bf16   # quicker
    .venv/bin/python benchmarks/benchmark.py --only decode --dtypes bf16 --decode-sizes 1024 2048   # sd's decode alone
    .venv/bin/python benchmarks/benchmark.py --only hires --dtypes bf16 --hires-sizes 512 1024     # sd's txt2img, hires fix
    .venv/bin/python benchmarks/benchmark.py --only prompts --dtypes bf16                            # long prompts' cost
    .venv/bin/python benchmarks/benchmark.py --only controlnet --dtypes bf16 --sizes 512              # one ControlNet's cost
    .venv/bin/python benchmarks/benchmark.py --only lora                                             # LoRA merging's cost
    make bench-peers                                       # --only peers: OpenVINO and stable-diffusion.cpp beside sd and diffusers
    .venv/bin/python benchmarks/benchmark.py --only compile --dtypes bf16 --sizes 512   # torch.compile's step and compile time

Writes a random checkpoint to a temporary folder (or takes --checkpoints), measures the machine's
matmul peaks, then for each dtype: loading (.safetensors and .ckpt), text encoding, one guided U-Net
step, VAE decode and encode at each size, U-Net steps of both sides taken in turn in one process (the
ratio least moved by the machine's drifting speed), and a whole txt2img run. It prints a table with the ratio
sd/diffusers, the GFLOP/s reached against the matmul peak, and the PSNR between the fp32 and bf16
images, and writes every figure to benchmarks/results.json.

`--only decode` (not part of the default run) measures sd's VAE decode alone, untiled and tiled (tiles of
`--decode-tile` latents), at each of `--decode-sizes`, each in its own process: the time of a decode and its
peak RSS, counted from after the load, once every model but the decoder is freed (`rss_before_gib` is what
the process held then: Python, torch and the decoder's weights).

`--only hires` (not part of the default run) measures sd's generate() text-to-image of one image at each of
`--hires-sizes`, each in its own process: at `--hires-base` (512) plainly, above it by hires fix from it, in
`--hires-first-steps` and `--hires-steps` steps, the decode tiled from `--tiled-from` (2048) up: the whole
render's, each U-Net step's and the decode's time, and the render's peak RSS counted from after the load.
`--only prompts` (not part of the default run) measures, in one process, the encoding of a 1-chunk and a 3-chunk
prompt and a guided U-Net step at the largest of `--sizes` attending to 77 and to 231 context tokens, in turn.
`--only controlnet` (not part of the default run) measures, in one process, a guided U-Net step (batch 2) at the
largest of `--sizes` without and with one ControlNet (its residuals computed in the same step), in turn, and the
ControlNet's load time and the memory it adds (a random full-size one, fp16 on disk, or `--controlnet FILE`).
`--only lora` (not part of the default run) measures, in one process per dtype, the merging of random kohya LoRA files
of rank `--lora-rank` (128: 151 MB in fp16, as kohya saves them) over every attention and feed-forward layer of the
U-Net and the text encoder (kohya's default targets): the time to apply (read the file, merge) and to remove 1 and
3 of them, one guided U-Net step at the largest of `--sizes` with 3 merged against without, in turn, and the peak
RSS of such a step (counted from after the load) with and without them.
`--only peers` (not part of the default run; `make bench-peers` installs the peers first) measures the engines users would
pick instead, in the same run and on the same checkpoint: in one process, sd's and diffusers' guided U-Net step and VAE
decode at the largest of `--sizes`, diffusers eager and with its U-Net and VAE in channels_last, in turns; OpenVINO's,
from diffusers' models of the same weights converted by openvino.convert_model (bf16 inference precision where the
CPU has bf16); stable-diffusion.cpp's `--peer-steps` steps of Euler at CFG 7 from the .safetensors, at each of
`--sdcpp-wtypes`; and sd's whole `--steps`-step Euler image at CFG 7, load included, against stable-diffusion.cpp's
estimate for as many steps (load + text encoding + its sampling time scaled to as many steps + decode). Each peer runs in its own environment
(`--peer-envs`, benchmarks/peers/); one that is not installed, or fails, is reported as such in the table.
`--only compile` (not part of the default run) measures issue 21's `torch.compile` at the largest of `--sizes`, each in
its own process: a guided U-Net step eager on the paths chosen for the CPU, eager on the paths inductor can trace
(TRACEABLE_PATHS), and compiled from those by inductor (freezing; default mode, and max-autotune with inductor's own
C++ GEMM templates, AMX ones where the CPU has AMX), each compiled mode twice: the first call's seconds with
inductor's cache cold, then warm, and `--repeat` steps (`--compile-modes` picks among the four).
The decode, hires, prompts, controlnet and lora groups report CPU seconds (user + system, all threads) beside wall seconds, and
every measurement records the machine's load averages before and after it.

diffusers' `from_single_file` needs files from a model hub, so its models are built from the same
tensors by its own single-file converters (on the meta device, the fastest way it offers), with its
default (SDPA) attention. On a CPU without bf16 instructions sd's bf16 stores the weights in bf16
and computes in fp32 (sd/precision.py); diffusers is then given the same with its layerwise casting
(`apply_layerwise_casting`, storage bf16, compute fp32), since its plain bf16 runs about 10x slower.
"""

import argparse
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ["HF_HUB_OFFLINE"] = "1"

from sd import kernels  # noqa: E402
from sd.models.layers import linear_as_convolution  # noqa: E402
from sd.precision import DTYPES, compute_dtype, cpu_has_bf16  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
LONG_PROMPT = ", ".join([PROMPT] * 18)  # 18 x 8 tokens and 17 commas: three chunks of 75
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True,
)
CPU = torch.device("cpu")


def peak_rss_gib() -> float:
    """This process's peak resident memory. VmHWM rather than getrusage: a child's ru_maxrss
    starts from its parent's at fork, and our parent held the whole checkpoint when writing it."""
    status = Path("/proc/self/status").read_text()
    kilobytes = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return kilobytes / 2**20


def current_rss_gib() -> float:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 2**20


def reset_peak_rss() -> None:
    """Makes VmHWM start again from the current RSS (Linux's clear_refs, value 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def summary(seconds: list[float]) -> dict:
    seconds = sorted(seconds)
    return {"min": seconds[0], "median": seconds[len(seconds) // 2], "runs": len(seconds)}


# ---- workers: each runs in its own process and prints one JSON line ----


def load_sd(checkpoint: Path, dtype: torch.dtype):
    from sd import load_models

    return load_models(checkpoint, dtype=dtype)


def load_diffusers(checkpoint: Path, dtype: torch.dtype):
    from diffusers import DDPMScheduler
    from diffusers.hooks import apply_layerwise_casting
    from reference import reference_pipeline

    pipe = reference_pipeline(checkpoint, DDPMScheduler.from_config(SD15_SCHEDULER), plain_attention=False)
    compute = compute_dtype(dtype, CPU)
    if compute == dtype:
        return pipe.to(dtype=dtype)
    # not the text encoder (0.25 GB in bf16): the pipeline casts the prompt's embeddings to its storage dtype
    for model in (pipe.unet, pipe.vae):
        apply_layerwise_casting(model, storage_dtype=dtype, compute_dtype=compute)
    return pipe


def worker_peaks(**_) -> dict:
    """The best matrix-product rate of each dtype: what a step could reach at most. Each dtype's best of
    torch.mm (MKL for fp32, oneDNN for bf16) and the same product as a 1x1 convolution (oneDNN), which on AMD
    CPUs runs fp32 about twice as fast as MKL. Smaller matrices for bf16 on a CPU without bf16 instructions,
    where it runs at well under 10 GFLOP/s."""
    peaks = {}
    for name, size in (("fp32", 2048), ("bf16", 2048 if cpu_has_bf16() else 512)):
        a, b = torch.randn(size, size).to(DTYPES[name]), torch.randn(size, size).to(DTYPES[name])
        products = (lambda: a @ b, lambda: linear_as_convolution(a[None], b, None))
        best = min(timed_once(product) for product in products for _ in range(4))
        peaks[f"{name}_gflops"] = 2 * size**3 / best / 1e9
    return peaks


def timed_once(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def worker_load(impl: str, checkpoint: Path, dtype: torch.dtype, **_) -> dict:
    """The load's seconds, and what they went to: CPU seconds, page faults, bytes read from the disk (a cold page
    cache reads the whole file), and for sd the seconds spent reading the file's index, converting (casting where the
    weights are not packed) and packing."""
    phases = timed_load_phases() if impl == "sd" else {}
    start, faults, read = clocks(), resource.getrusage(resource.RUSAGE_SELF), disk_read_bytes()
    models = (load_sd if impl == "sd" else load_diffusers)(checkpoint, dtype)
    seconds, cpu_seconds = elapsed(start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    del models
    return {"load_s": seconds, "load_cpu_s": cpu_seconds, "minor_faults": after.ru_minflt - faults.ru_minflt,
            "major_faults": after.ru_majflt - faults.ru_majflt, "disk_read_gib": (disk_read_bytes() - read) / 2**30,
            **{f"{name}_s": sum(times) for name, times in phases.items()}}


def timed_load_phases() -> dict[str, list[float]]:
    """Wraps the parts of sd's load that can take long on some CPU (oneDNN's packing reorders, for one) so that
    each call's seconds are added to the lists returned."""
    from sd.files import loader

    phases = {}
    for name in ("read_checkpoint", "convert", "pack_weights"):
        def timed_call(*args, _function=getattr(loader, name), _times=phases.setdefault(name, []), **kwargs):
            start = time.perf_counter()
            try:
                return _function(*args, **kwargs)
            finally:
                _times.append(time.perf_counter() - start)
        setattr(loader, name, timed_call)
    return phases


def disk_read_bytes() -> int:
    """Bytes this process has caused to be read from storage (not from the page cache)."""
    return next(int(line.split()[1]) for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("read_bytes:"))


class CallTimes:
    """The wall and CPU seconds of every forward call of `module`, in order (see clocked)."""

    def __init__(self, module: torch.nn.Module):
        self.runs: list[tuple[float, float]] = []
        starts = []
        module.register_forward_pre_hook(lambda *_: starts.append(clocks()))
        module.register_forward_hook(lambda *_: self.runs.append(elapsed(starts.pop())))

    @property
    def wall(self) -> list[float]:
        return [wall for wall, _ in self.runs]


def clocks() -> tuple[float, float]:
    """Wall and CPU time now. CPU time is this process's user + system time over all its threads: on a shared
    machine it moves less than wall time (not nothing: a thread waiting for its descheduled sibling spins)."""
    return time.perf_counter(), time.process_time()


def elapsed(start: tuple[float, float]) -> tuple[float, float]:
    """Wall and CPU seconds since `start` (from clocks())."""
    wall, cpu = clocks()
    return wall - start[0], cpu - start[1]


def clocked(function) -> tuple[float, float]:
    """Wall and CPU seconds of one call of `function`."""
    start = clocks()
    function()
    return elapsed(start)


def summaries(name: str, runs: list[tuple[float, float]]) -> dict:
    """`name`_s and `name`_cpu_s: the summaries of the wall and of the CPU seconds of `runs`."""
    return {f"{name}_s": summary([wall for wall, _ in runs]), f"{name}_cpu_s": summary([cpu for _, cpu in runs])}


def worker_generate(impl: str, checkpoint: Path, dtype: torch.dtype, size: int, steps: int, image_path: str, **_) -> dict:
    """A whole txt2img run with DDPM, seed 0; the image is saved for the PSNR between dtypes."""
    if impl == "sd":
        from sd import generate

        models = load_sd(checkpoint, dtype)
        unet = CallTimes(models["diffusion"])
        start = time.perf_counter()
        image = generate(PROMPT, steps=steps, seed=0, width=size, height=size, models=models, progress=False)[0]
        pixels = np.asarray(image)
    else:
        pipe = load_diffusers(checkpoint, dtype)
        unet = CallTimes(pipe.unet)
        start = time.perf_counter()
        output = pipe(PROMPT, num_inference_steps=steps, height=size, width=size, generator=torch.Generator().manual_seed(0), output_type="np")
        pixels = (output.images[0] * 255).round().astype(np.uint8)
    total = time.perf_counter() - start
    np.save(image_path, pixels)
    return {"total_s": total, "unet_step_s": summary(unet.wall)}


def unet_inputs(size: int, dtype: torch.dtype, generator: torch.Generator, context_width: int = 768) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and text context for one guided U-Net step (batch 2) at `size`, drawn from `generator` (SD 1.5's
    768-wide context unless the model's is another, as the demo model's is)."""
    latents = torch.randn(2, 4, size // 8, size // 8, generator=generator).to(dtype)
    context = torch.randn(2, 77, context_width, generator=generator).to(dtype)
    return latents, context


def worker_components(impl: str, checkpoint: Path, dtype: torch.dtype, size: int, repeat: int, **_) -> dict:
    """Each stage alone, inputs in the dtype the models compute in: text encoding, one guided U-Net
    step (batch 2), VAE decode and encode (batch 1). A warm-up call first, which pages the weights in."""
    compute = compute_dtype(dtype, CPU)
    generator = torch.Generator().manual_seed(0)
    latents, context = unet_inputs(size, compute, generator)
    image = (torch.rand(1, 3, size, size, generator=generator) * 2 - 1).to(compute)
    tokens = torch.randint(0, 49406, (2, 77), generator=generator)
    if impl == "sd":
        models = load_sd(checkpoint, dtype)
        stages = {
            "clip": lambda: models["clip"](tokens, compute),
            "unet_step": lambda: models["diffusion"](latents, context, 500),
            "vae_decode": lambda: models["decoder"](latents[:1]),
            "vae_encode": lambda: models["encoder"](image, latents[:1]),
        }
    else:
        pipe = load_diffusers(checkpoint, dtype)
        stages = {
            "clip": lambda: pipe.text_encoder(tokens),
            "unet_step": lambda: pipe.unet(latents, 500, encoder_hidden_states=context),
            "vae_decode": lambda: pipe.vae.decode(latents[:1]),
            "vae_encode": lambda: pipe.vae.encode(image).latent_dist.sample(generator),
        }
    results = {}
    for stage, function in stages.items():
        function()
        results[f"{stage}_s"] = summary([timed_once(function) for _ in range(repeat)])
    return results


def worker_turns(checkpoint: Path, dtype: torch.dtype, size: int, repeat: int, **_) -> dict:
    """One guided U-Net step (batch 2) of each side in turn, both models in one process: a slow spell of the
    machine (its speed drifts by 10-15 % over minutes here) then falls on both sides alike, which makes this
    the steadiest ratio of the two. Each side's own peak memory is in the components figures."""
    latents, context = unet_inputs(size, compute_dtype(dtype, CPU), torch.Generator().manual_seed(0))
    ours, theirs = load_sd(checkpoint, dtype)["diffusion"], load_diffusers(checkpoint, dtype).unet
    steps = {"sd": lambda: ours(latents, context, 500), "diffusers": lambda: theirs(latents, 500, encoder_hidden_states=context)}
    seconds = {impl: [] for impl in steps}
    for turn in range(repeat + 1):  # the first turn warms up
        for impl, step in steps.items():
            elapsed = timed_once(step)
            if turn:
                seconds[impl].append(elapsed)
    ratios = [a / b for a, b in zip(seconds["sd"], seconds["diffusers"])]
    return {"sd_unet_step_s": summary(seconds["sd"]), "diffusers_unet_step_s": summary(seconds["diffusers"]), "ratio": summary(ratios)}


def worker_decode(checkpoint: Path, dtype: torch.dtype, size: int, tiled: bool, tile: int, repeat: int, **_) -> dict:
    """sd's VAE decode alone (batch 1) at `size`, tiled or not. Only the decoder is kept after the load and
    the peak RSS starts again from there, so the peak is the decode's own plus what the process held before
    it. A warm-up call on one tile's latents first, which pages the weights in (on a CPU without bf16
    instructions a 2048x2048 decode takes minutes: a warm-up at full size would double that)."""
    from sd.models.layers import trim_heap

    decoder = load_sd(checkpoint, dtype)["decoder"]
    gc.collect()
    trim_heap()
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(compute_dtype(dtype, CPU))
    before = current_rss_gib()
    reset_peak_rss()
    decoder(latents[..., :tile, :tile])

    def decode():
        decoder(latents, tiled=tiled, tile_size=tile)

    return {**summaries("decode", [clocked(decode) for _ in range(repeat)]), "rss_before_gib": before}


def worker_hires(checkpoint: Path, dtype: torch.dtype, base: int, size: int, steps: int, hires_steps: int, tiled: bool, **_) -> dict:
    """sd's text-to-image of one size x size image, seed 0, with `sd generate`'s sampler (DPM++ 2M Karras): `steps`
    steps at `size` where it is `base`, else hires fix, `steps` at base x base then `hires_steps` at the hires size
    (A1111's defaults: latent upscaler, strength 0.7). Decoded in tiles if `tiled`. The peak RSS is counted from
    after the load (`rss_before_gib`: what the process held then; `load_peak_rss_gib`: the load's own peak)."""
    from sd import generate

    models = load_sd(checkpoint, dtype)
    load_peak = peak_rss_gib()
    unet, decoder = CallTimes(models["diffusion"]), CallTimes(models["decoder"])
    computed = {}
    for name in ("diffusion", "decoder"):
        record_input_dtype(models[name], computed, f"{name}_computed_in")
    hires = dict(hires_scale=size / base, hires_steps=hires_steps) if size != base else {}
    before = current_rss_gib()
    reset_peak_rss()
    total = clocked(lambda: generate(PROMPT, steps=steps, seed=0, width=base, height=base, sampler="dpmpp_2m", karras=True,
                                     vae_tiling=tiled, models=models, progress=False, **hires))
    passes = {**summaries("unet_step", unet.runs[:steps]), **(summaries("hires_unet_step", unet.runs[steps:]) if hires else {})}
    return {**summaries("total", [total]), **passes, **summaries("decode", decoder.runs), **computed, "rss_before_gib": before, "load_peak_rss_gib": load_peak}


def record_input_dtype(module: torch.nn.Module, record: dict, key: str) -> None:
    """Keeps in record[key] the dtype of the first input of the module's first call: the dtype it computes in, as
    sd's layers cast their weights to their input's (sd/models/layers.py)."""
    def hook(_, inputs):
        record.setdefault(key, str(inputs[0].dtype).removeprefix("torch."))

    module.register_forward_pre_hook(hook)


def worker_prompts(checkpoint: Path, dtype: torch.dtype, size: int, repeat: int, **_) -> dict:
    """The cost of long prompts (issue 19), in one process: sd.encode_prompt of a 1-chunk and of a 3-chunk prompt
    (A1111's emphasis, clip skip 1), and one guided U-Net step (batch 2) at `size` attending to each one's context
    (77 and 231 tokens); named by the chunks and tokens the encodings came out with."""
    from sd import encode_prompt

    models = load_sd(checkpoint, dtype)
    compute = compute_dtype(dtype, CPU)
    latents = torch.randn(2, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(compute)
    calls = {}
    for text in (PROMPT, LONG_PROMPT):
        def encode(text=text):
            return encode_prompt(models, text, clip_skip=1, emphasis="original", dtype=compute)  # (1, 77k, 768)

        context = torch.cat([encode()] * 2)  # the negative prompt's half and the prompt's
        calls[f"encode_{context.shape[1] // 77}_chunks"] = encode
        calls[f"unet_step_{context.shape[1]}_tokens"] = lambda context=context: models["diffusion"](latents, context, 500)
    return in_turns(calls, repeat)


def worker_controlnet(checkpoint: Path, dtype: torch.dtype, size: int, repeat: int, controlnet: str, **_) -> dict:
    """Issue 22's cost of one ControlNet: its load (time, and the RSS it adds), and in turns a guided U-Net step
    (batch 2) at `size` without it and with it (the ControlNet's forward pass, then the U-Net's with its
    residuals), the control image's hint features computed once beforehand as generate() does."""
    from sd.models.controlnet import Control, Guide
    from sd.files.loader import load_controlnet

    unet = load_sd(checkpoint, dtype)["diffusion"]
    compute = compute_dtype(dtype, CPU)
    generator = torch.Generator().manual_seed(0)
    latents, context = unet_inputs(size, compute, generator, unet.config.context_width)
    before = current_rss_gib()
    start = time.perf_counter()
    model = load_controlnet(controlnet, dtype=dtype)
    loaded = {"controlnet_load_s": time.perf_counter() - start, "controlnet_rss_gib": current_rss_gib() - before}
    hint = model.encode_hint(torch.rand(1, 3, size, size, generator=generator).to(compute))
    control = Control([Guide(model, hint, 1.0, 0.0, 1.0, guess_mode=False)], calls=1)
    calls = {"unet_step": lambda: unet(latents, context, 500),
             "controlled_unet_step": lambda: unet(latents, context, 500, control(latents, context, 500, 0, guided=True))}
    return {**loaded, **in_turns(calls, repeat)}


def typical_lora(sites: dict, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A kohya LoRA's tensors in fp16 over kohya's default targets: the text encoder's attention and MLP layers,
    the U-Net's transformer blocks (attention, feed-forward, proj_in/proj_out)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, site in sites.items():
        if name.startswith("lora_te_") or "_attentions_" in name:
            out, inputs, *kernel = site.shape
            tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, inputs, *kernel, generator=generator) * 0.01).half()
            tensors[f"{name}.lora_up.weight"] = (torch.randn(out, rank, *kernel, generator=generator) * 0.01).half()
            tensors[f"{name}.alpha"] = torch.tensor(rank / 2)
    return tensors


def worker_lora(checkpoint: Path, dtype: torch.dtype, size: int, repeat: int, lora_rank: int, **_) -> dict:
    """LoRA merging's cost (issue 20), in one process: applying (reading the files, merging into the text encoder
    and the U-Net) and removing 1 and 3 LoRAs; a guided U-Net step with 3 merged and without, in turn; that step's
    peak RSS above the loaded models with and without them."""
    from contextlib import ExitStack

    from safetensors.torch import save_file

    from sd.files.lora import LoraLibrary, LoraTag, read_lora
    from sd.files.lora_merge import lora_sites, merged, plan_changes

    models = load_sd(checkpoint, dtype)
    folder = Path(tempfile.mkdtemp())
    for seed in range(3):
        save_file(typical_lora(lora_sites(models), lora_rank, seed), folder / f"lora-{seed}.safetensors")
    library = LoraLibrary(folder)
    latents, context = unet_inputs(size, compute_dtype(dtype, CPU), torch.Generator().manual_seed(0), models["diffusion"].config.context_width)

    def apply(count: int, stack: ExitStack) -> None:
        loras = [(LoraTag(name, 0.8, 0.8), read_lora(name, library[name])) for name in list(library)[:count]]
        changes = plan_changes(models, loras)
        stack.enter_context(merged(changes["clip"]))
        stack.enter_context(merged(changes["diffusion"]))

    results = {"lora_file_mb": (folder / "lora-0.safetensors").stat().st_size / 1e6}
    for count in (1, 3):
        applying, removing = [], []
        for turn in range(repeat + 1):  # the first turn warms up: pages the files in
            stack = ExitStack()
            applied = clocked(lambda: apply(count, stack))
            removed = clocked(stack.close)
            if turn:
                applying.append(applied)
                removing.append(removed)
        results.update(summaries(f"apply_{count}", applying))
        results.update(summaries(f"remove_{count}", removing))
    step = lambda: models["diffusion"](latents, context, 500)  # noqa: E731
    plain, with_loras = [], []
    for turn in range(repeat + 1):
        timing = clocked(step)
        with ExitStack() as stack:
            apply(3, stack)
            merged_timing = clocked(step)
        if turn:
            plain.append(timing)
            with_loras.append(merged_timing)
    results.update(summaries("unet_step", plain))
    results.update(summaries("unet_step_3_loras", with_loras))
    results["rss_after_load_gib"] = current_rss_gib()
    reset_peak_rss()
    step()
    results["peak_rss_step_gib"] = peak_rss_gib()
    reset_peak_rss()
    with ExitStack() as stack:
        apply(3, stack)
        step()
        results["peak_rss_step_3_loras_gib"] = peak_rss_gib()
    return results


def in_turns(calls: dict, repeat: int) -> dict:
    """The wall and CPU seconds of each of `calls`, one call of each per turn over `repeat` turns after a warm-up
    turn, so that a slow spell of the machine falls on all of them alike."""
    runs = {name: [] for name in calls}
    for turn in range(repeat + 1):
        for name, call in calls.items():
            timing = clocked(call)
            if turn:
                runs[name].append(timing)
    return {key: value for name in calls for key, value in summaries(name, runs[name]).items()}


def worker_peers_torch(checkpoint: Path, dtype: torch.dtype, size: int, repeat: int, **_) -> dict:
    """The peers group's PyTorch side, in one process: sd's and diffusers' guided U-Net step (batch 2) and VAE decode at
    `size`, diffusers eager and with its U-Net and VAE in channels_last (diffusers' advice for CPUs), in turns (see
    in_turns). diffusers' pipelines are built first: each build peaks at the checkpoint's fp32 size, and the
    channels_last one needs no text encoder."""
    eager = load_diffusers(checkpoint, dtype)
    channels_last = load_diffusers(checkpoint, dtype)
    del channels_last.text_encoder
    gc.collect()
    for model in (channels_last.unet, channels_last.vae):
        model.to(memory_format=torch.channels_last)
    models = load_sd(checkpoint, dtype)
    latents, context = unet_inputs(size, compute_dtype(dtype, CPU), torch.Generator().manual_seed(0))
    calls = {"sd_unet_step": lambda: models["diffusion"](latents, context, 500)}
    for name, pipe in (("diffusers", eager), ("diffusers_channels_last", channels_last)):
        calls[f"{name}_unet_step"] = lambda unet=pipe.unet: unet(latents, 500, encoder_hidden_states=context)
    calls["sd_vae_decode"] = lambda: models["decoder"](latents[:1])
    for name, pipe in (("diffusers", eager), ("diffusers_channels_last", channels_last)):
        calls[f"{name}_vae_decode"] = lambda vae=pipe.vae: vae.decode(latents[:1])
    return in_turns(calls, repeat)


def worker_peers_generate(checkpoint: Path, dtype: torch.dtype, size: int, steps: int, **_) -> dict:
    """sd's whole text-to-image as the peers group has stable-diffusion.cpp render it: Euler, CFG 7, seed 0, the load
    timed too."""
    from sd import generate

    start = time.perf_counter()
    models = load_sd(checkpoint, dtype)
    load = time.perf_counter() - start
    unet, decoder = CallTimes(models["diffusion"]), CallTimes(models["decoder"])
    start = time.perf_counter()
    generate(PROMPT, steps=steps, seed=0, width=size, height=size, sampler="euler", cfg_scale=7.0, models=models, progress=False)
    return {"load_s": load, "generate_s": time.perf_counter() - start, **summaries("unet_step", unet.runs), **summaries("vae_decode", decoder.runs)}


COMPILE_MODES = ("chosen", "traceable", "default", "max-autotune")
COMPILED = COMPILE_MODES[2:]  # inductor's modes, each measured cold and then with its cache warm
# sd's paths that inductor can trace: packed oneDNN weights are opaque to it, and the attention's pieces, a Python
# loop over heads and rows, would be unrolled into thousands of products, as would Winograd's loop over block rows
TRACEABLE_PATHS = "attention=sdpa,packing=off,linear=matmul,channels_last=on,convolution=direct"


def worker_compile(checkpoint: Path, dtype: torch.dtype, size: int, repeat: int, mode: str, cache: str, **_) -> dict:
    """Issue 21's item 5, in one process: a guided U-Net step (batch 2) at `size` eager on the paths chosen for this CPU
    (`mode` "chosen"), eager on TRACEABLE_PATHS ("traceable"), or compiled from those by inductor, freezing on (it then
    packs the weights for oneDNN itself): "default", or "max-autotune", which also times inductor's own C++ GEMM
    templates (AMX micro-kernels where the CPU has AMX) against oneDNN's products. The first call's seconds include the
    compile's, with inductor's cache in `cache`: cold in the first process of a mode, warm in the next; `paths` are
    those the step took (sd/kernels.py)."""
    if mode != "chosen":
        os.environ["SD_KERNELS"] = TRACEABLE_PATHS
    unet = load_sd(checkpoint, dtype)["diffusion"]
    compute = compute_dtype(dtype, CPU)
    latents, context = unet_inputs(size, compute, torch.Generator().manual_seed(0), unet.config.context_width)
    step = unet
    if mode in COMPILED:
        import torch._inductor.config as inductor

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        inductor.freezing = True
        if mode == "max-autotune":
            inductor.max_autotune, inductor.max_autotune_gemm_backends = True, "CPP,ATEN"
        step = torch.compile(unet, dynamic=False)
    first = clocked(lambda: step(latents, context, 500))
    paths = {name: kernels.choice(name, CPU, compute) for name in kernels.CHOICES}
    return {"first_call_s": first[0], "paths": paths, **summaries("unet_step", [clocked(lambda: step(latents, context, 500)) for _ in range(repeat)])}


WORKERS = {"peaks": worker_peaks, "decode": worker_decode, "load": worker_load, "components": worker_components, "generate": worker_generate,
           "turns": worker_turns, "hires": worker_hires, "prompts": worker_prompts, "controlnet": worker_controlnet,
           "lora": worker_lora, "peers_torch": worker_peers_torch, "peers_generate": worker_peers_generate,
           "compile": worker_compile}


def run_worker(spec: dict) -> dict:
    spec = {**spec, "checkpoint": Path(spec.get("checkpoint", ".")), "dtype": DTYPES[spec.get("dtype", "fp32")]}
    torch.manual_seed(0)
    with torch.inference_mode():
        result = WORKERS[spec["group"]](**spec)
    return {**result, "peak_rss_gib": peak_rss_gib()}


# ---- the driver ----


# The peers, each run by its own environment's python (see the Makefile's peer-envs): group -> environment, script
PEERS = {"openvino": (".venv-openvino", "openvino_peer.py"), "sdcpp": (".venv-sdcpp", "sdcpp_peer.py")}
PEER_SCRIPTS = ROOT / "benchmarks" / "peers"


# Variables that keep PyTorch, oneDNN (OpenVINO's too) and MKL below the CPU's own instructions: set to AVX2 on a
# newer CPU, they run the code paths of a CPU with AVX2 alone.
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_description() -> dict:
    """The CPU's model and the capabilities that decide which kernels are fastest on it, from /proc/cpuinfo's
    first processor (elsewhere only the processor's name)."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text().split("\n\n")[0] if cpuinfo.exists() else ""
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}
    flags = set(fields.get("flags", "").split())
    return {"model_name": fields.get("model name", platform.processor()), "family": fields.get("cpu family"), "model": fields.get("model"),
            "avx2": "avx2" in flags, "avx512_bf16": "avx512_bf16" in flags, "amx": {"amx_tile", "amx_bf16"} <= flags,
            "capped": {name: os.environ[name] for name in ISA_CAPS if os.environ.get(name)}}


def cpu_label(cpu: dict) -> str:
    """E.g. "AMD EPYC (family 25, model 17): AVX2, AVX512-BF16, no AMX", and the caps set on its instructions."""
    capabilities = [name if cpu[key] else f"no {name}" for key, name in (("avx2", "AVX2"), ("avx512_bf16", "AVX512-BF16"), ("amx", "AMX"))]
    capped = "".join(f"; {name}={value}" for name, value in cpu.get("capped", {}).items())
    return f"{cpu['model_name']} (family {cpu['family']}, model {cpu['model']}): {', '.join(capabilities)}{capped}"


CPU_LABEL = cpu_label(cpu_description())


def measure(spec: dict, peer_envs: Path = ROOT) -> dict:
    """Runs one worker in a fresh process, so that each peak RSS is its own (a peer's worker: see run_peer). The load
    averages (1, 5, 15 minutes) before and after it tell how busy the machine was."""
    load_before = os.getloadavg()
    if spec["group"] in PEERS:
        result = run_peer(spec, peer_envs)
    else:
        finished = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
        if finished.returncode:
            sys.exit(f"{spec} failed:\n{finished.stderr}")
        result = json.loads(finished.stdout.strip().splitlines()[-1])
    return {**spec, **result, "cpu": CPU_LABEL, "loadavg_before": load_before, "loadavg_after": os.getloadavg()}


def run_peer(spec: dict, peer_envs: Path) -> dict:
    """A peer's figures from its script, run by its environment's python, or why there are none (`not_installed`,
    `failed`): peers are optional, so their absence is reported, not an error of the run."""
    environment, script = PEERS[spec["group"]]
    folder = peer_envs / environment
    if not (folder / "installed").exists():
        log = peer_envs / "build" / "peers" / f"{spec['group']}-install.log"
        reason = f"its install failed, {log} ends: {last_line(log.read_text())}" if log.exists() else "`make peer-envs` installs it"
        return {"not_installed": f"no {folder}: {reason}"}
    finished = subprocess.run([str(folder / "bin" / "python"), str(PEER_SCRIPTS / script), json.dumps(spec)], capture_output=True, text=True)
    if finished.returncode:
        return {"failed": last_line(finished.stderr)}
    return json.loads(finished.stdout.strip().splitlines()[-1])


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def plan(args, files: dict[str, Path], images: Path) -> list[dict]:
    """Every measurement; sd and diffusers alternate, so that a slow spell of the machine hits both."""
    specs = [dict(group="peaks")]
    for dtype in args.dtypes:
        pairs = []
        if "load" in args.only:
            pairs += [dict(group="load", format=suffix, checkpoint=str(path), run=run) for suffix, path in files.items() for run in range(args.repeat)]
        if "components" in args.only:
            pairs += [dict(group="components", size=size, repeat=args.repeat, checkpoint=str(files[".safetensors"])) for size in args.sizes]
        if "generate" in args.only:
            pairs.append(dict(group="generate", size=max(args.sizes), steps=args.steps, checkpoint=str(files[".safetensors"])))
        if "turns" in args.only:
            specs.append(dict(group="turns", size=max(args.sizes), repeat=2 * args.repeat, checkpoint=str(files[".safetensors"]), dtype=dtype))
        if "decode" in args.only:
            specs += [dict(group="decode", impl="sd", dtype=dtype, size=size, tiled=tiled, tile=args.decode_tile, repeat=args.repeat,
                           checkpoint=str(files[".safetensors"])) for size in args.decode_sizes for tiled in (False, True)]
        if "hires" in args.only:
            specs += [dict(group="hires", impl="sd", dtype=dtype, base=args.hires_base, size=size, steps=args.hires_first_steps, hires_steps=args.hires_steps,
                           tiled=size >= args.tiled_from, checkpoint=str(files[".safetensors"])) for size in args.hires_sizes]
        if "prompts" in args.only:
            specs.append(dict(group="prompts", impl="sd", dtype=dtype, size=max(args.sizes), repeat=args.repeat, checkpoint=str(files[".safetensors"])))
        if "controlnet" in args.only:
            specs.append(dict(group="controlnet", impl="sd", dtype=dtype, size=max(args.sizes), repeat=args.repeat, checkpoint=str(files[".safetensors"]),
                              controlnet=str(args.controlnet)))
        if "lora" in args.only:
            specs.append(dict(group="lora", impl="sd", dtype=dtype, size=max(args.sizes), repeat=args.repeat, lora_rank=args.lora_rank,
                              checkpoint=str(files[".safetensors"])))
        if "peers" in args.only:
            common = dict(dtype=dtype, size=max(args.sizes), checkpoint=str(files[".safetensors"]))
            precision = "bf16" if dtype == "bf16" and cpu_has_bf16() else "fp32"  # OpenVINO has no bf16 without the instructions
            specs += [dict(group="peers_torch", repeat=args.repeat, **common), dict(group="openvino", repeat=args.repeat, precision=precision, **common),
                      dict(group="peers_generate", steps=args.steps, **common)]
        for pair in pairs:
            for impl in ("sd", "diffusers"):
                extra = {"image_path": str(images / f"{impl}-{dtype}.npy")} if pair["group"] == "generate" else {}
                specs.append({**pair, **extra, "impl": impl, "dtype": dtype})
        if "compile" in args.only:
            specs += [dict(group="compile", impl="sd", dtype=dtype, size=max(args.sizes), repeat=args.repeat, mode=mode, run=run,
                           cache=str(images / f"inductor-{dtype}-{mode}"), checkpoint=str(files[".safetensors"]))
                      for mode in args.compile_modes for run in range(2 if mode in COMPILED else 1)]
    if "peers" in args.only:  # stable-diffusion.cpp's weights are its own choice, not the run's dtype
        specs += [dict(group="sdcpp", wtype=wtype, size=max(args.sizes), steps=args.peer_steps, checkpoint=str(files[".safetensors"]))
                  for wtype in args.sdcpp_wtypes]
    return specs


# what each load run's time went to (worker_load), kept per run
LOAD_BREAKDOWN = ("load_cpu_s", "minor_faults", "major_faults", "disk_read_gib", "read_checkpoint_s", "convert_s", "pack_weights_s")


def merge_results(results: list[dict]) -> list[dict]:
    """One entry per load setting, its runs (each a fresh process) summarised as min and median, with what each
    run's time went to; each U-Net steps-in-turn result split into one entry per side, as the table pairs them
    (the ratios go with sd's)."""
    merged, loads = [], {}
    for result in results:
        if result["group"] == "turns":
            common = {key: value for key, value in result.items() if not key.endswith(("_s", "ratio", "_gib"))}
            ours = {**common, "impl": "sd", "unet_step_s": result["sd_unet_step_s"], "ratio_of_turns": result["ratio"]}
            merged += [ours, {**common, "impl": "diffusers", "unet_step_s": result["diffusers_unet_step_s"]}]
            continue
        if result["group"] != "load":
            merged.append(result)
            continue
        key = (result["impl"], result["dtype"], result["format"])
        breakdown = {name: value for name, value in result.items() if name in LOAD_BREAKDOWN}
        if key not in loads:
            loads[key] = {**{name: value for name, value in result.items() if name not in LOAD_BREAKDOWN}, "load_s": [], "peak_rss_gib": [], "runs": []}
            merged.append(loads[key])
        loads[key]["load_s"].append(result["load_s"])
        loads[key]["peak_rss_gib"].append(result["peak_rss_gib"])
        loads[key]["runs"].append({"load_s": result["load_s"], **breakdown})
    for entry in loads.values():
        entry.pop("run")
        entry["load_s"], entry["peak_rss_gib"] = summary(entry["load_s"]), max(entry["peak_rss_gib"])
    return merged


def load_breakdown(results: list[dict]) -> list[str]:
    """Where each load's fastest run went, one line per load setting."""
    lines = []
    for result in (r for r in results if r["group"] == "load"):
        run = min(result["runs"], key=lambda run: run["load_s"])
        parts = [f"{name[:-2].replace('_', ' ')} {run[name]:.2f} s" for name in ("read_checkpoint_s", "convert_s", "pack_weights_s") if name in run]
        lines.append(f"{result['impl']} {result['dtype']} load {result['format']}, fastest run: {run['load_s']:.2f} s ({run['load_cpu_s']:.2f} CPU s), "
                     + "".join(f"{part}, " for part in parts)
                     + f"{run['disk_read_gib']:.2f} GiB read from disk, {run['major_faults']} major and {run['minor_faults']} minor page faults")
    return lines


def stage_flops(sizes: list[int]) -> dict[tuple[str, int], float]:
    """Floating-point operations of each stage at each size, counted on our models on the meta device
    (no memory, no arithmetic). Our U-Net and decoder fold each upsampling convolution into 16/36 of its
    work (sd/models/layers.py); it is counted here as diffusers computes it, a 3x3 convolution of the upsampled
    image, so that both do the same count of operations and GFLOP/s compare."""
    from torch.utils.flop_counter import FlopCounterMode

    from sd.models.clip import CLIP
    from sd.models.decoder import Decoder
    from sd.models.unet import UNet
    from sd.models.encoder import Encoder
    from sd.models.layers import Upsample

    flops = {}
    with torch.device("meta"):
        clip, unet, decoder, encoder = CLIP(), UNet(), Decoder(), Encoder()
        for upsample in (module for model in (unet, decoder) for module in model.modules() if isinstance(module, Upsample)):
            upsample.forward = lambda x, size=None, conv=upsample.conv: conv(F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest"))
        for size in sizes:
            latents = torch.empty(2, 4, size // 8, size // 8)
            calls = {
                "clip": lambda: clip(torch.zeros(2, 77, dtype=torch.long)),
                "unet_step": lambda: unet(latents, torch.empty(2, 77, 768), torch.tensor([500, 500])),
                "vae_decode": lambda: decoder(latents[:1]),
                "vae_encode": lambda: encoder(torch.empty(1, 3, size, size), latents[:1]),
            }
            for stage, call in calls.items():
                with FlopCounterMode(display=False) as counter:
                    call()
                flops[(stage, size)] = counter.get_total_flops()
    return flops


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def image_psnrs(images: Path) -> dict[str, float]:
    """PSNR in dB between the images of the same seed: fp32 against bf16 for each side, and sd against diffusers."""
    found = {path.stem: np.load(path) for path in images.glob("*.npy")}
    pairs = [("sd-fp32", "sd-bf16"), ("diffusers-fp32", "diffusers-bf16"), ("sd-fp32", "diffusers-fp32"), ("sd-bf16", "diffusers-bf16")]
    return {f"{a} vs {b}": psnr(found[a], found[b]) for a, b in pairs if a in found and b in found}


def label(result: dict) -> str:
    group, dtype = result["group"], result["dtype"]
    if group == "load":
        return f"{dtype} load {result['format']}"
    if group == "components":
        return f"{dtype} {result['size']}x{result['size']}"
    if group == "turns":
        return f"{dtype} {result['size']}x{result['size']} steps in turn"
    if group == "decode":
        return f"{dtype} decode {result['size']}x{result['size']} {'tiled' if result['tiled'] else 'untiled'}"
    if group == "hires":
        size, base = result["size"], result["base"]
        steps = f"hires fix: {result['steps']} steps at {base}, {result['hires_steps']} at {size}" if size != base else f"{result['steps']} steps"
        return f"{dtype} txt2img {size}x{size}, {steps}{', tiled decode' if result['tiled'] else ''}"
    if group == "prompts":
        return f"{dtype} prompts, U-Net at {result['size']}x{result['size']}"
    if group == "controlnet":
        return f"{dtype} one ControlNet, U-Net at {result['size']}x{result['size']}"
    if group == "lora":
        return f"{dtype} LoRA rank {result['lora_rank']}, U-Net at {result['size']}x{result['size']}"
    return f"{dtype} txt2img {result['size']}x{result['size']} {result['steps']} steps"


def table(results: list[dict], flops: dict, peaks: dict) -> list[str]:
    """One line per figure: sd and diffusers (min / median), their ratio of medians, sd's GFLOP/s."""
    pairs = {}
    for result in results:
        if result["group"] != "peaks":
            pairs.setdefault(label(result), {})[result["impl"]] = result
    width = max(map(len, pairs), default=0)
    lines = [f"{'measurement':{width}} {'figure':26} {'sd min/med':>15} {'diffusers min/med':>18} {'sd/diff':>8} {'sd GFLOP/s (% of peak)':>24}"]
    for name, pair in pairs.items():
        sd, reference = pair["sd"], pair.get("diffusers", {})
        for figure, ours in sd.items():
            if not figure.endswith(("_s", "_gib")):
                continue
            theirs = reference.get(figure)
            rate = ""
            operations = figure_flops(sd, figure, flops)
            if operations:
                gflops = operations / median(ours) / 1e9
                peak = peaks["bf16_gflops" if compute_dtype(DTYPES[sd["dtype"]], CPU) == torch.bfloat16 else "fp32_gflops"]
                rate = f"{gflops:8.1f} ({100 * gflops / peak:3.0f} %)"
            ratio = f"{median(ours) / median(theirs):8.2f}" if theirs else f"{'-':>8}"
            if "ratio_of_turns" in sd:
                rate = f"median of ratios {sd['ratio_of_turns']['median']:.2f}"
            lines.append(f"{name:{width}} {figure:26} {pair_text(ours):>15} {pair_text(theirs):>18} {ratio} {rate:>24}")
    return lines


PEER_GROUPS = ("peers_torch", "peers_generate", *PEERS)


def peers_table(results: list[dict]) -> list[str]:
    """The peers group's figures, one line per implementation: median (min) wall seconds, the median CPU seconds where
    measured (on a shared machine they move less than wall seconds), the ratio of wall medians to sd's in the same
    dtype (for stable-diffusion.cpp, whose weights are its own, in bf16 where measured), and the CPU; a peer without
    figures says why. diffusers is compared with sd in the process they share, a peer in a process of its own with
    sd in its own render's process, where that ran."""
    rows = []  # (figure, implementation, wall seconds or the reason there are none, CPU seconds, dtype of sd's figure to compare with, cpu)
    ours = {}  # (figure, dtype) -> sd's median beside diffusers
    alone = {}  # (figure, dtype) -> sd's median in its own render
    for result in results:
        group, cpu, size = result["group"], result["cpu"], f"{result['size']}x{result['size']}"
        dtype = result.get("dtype")
        if group == "peers_torch":
            for stage, figure in (("unet_step", f"guided U-Net step {size}"), ("vae_decode", f"VAE decode {size}")):
                ours[(figure, dtype)] = median(result[f"sd_{stage}_s"])
                for impl, name in (("sd", "sd"), ("diffusers", "diffusers eager"), ("diffusers_channels_last", "diffusers channels_last")):
                    rows.append((figure, f"{name} {dtype}", result[f"{impl}_{stage}_s"], result[f"{impl}_{stage}_cpu_s"], dtype, cpu))
        elif group == "peers_generate":
            figure = f"txt2img {size}, {result['steps']} steps Euler, load included"
            ours[(figure, dtype)] = result["load_s"] + result["generate_s"]
            ours[("load", dtype)] = result["load_s"]
            rows += [(figure, f"sd {dtype}", ours[(figure, dtype)], None, dtype, cpu), ("load", f"sd {dtype}", result["load_s"], None, dtype, cpu)]
            for stage, figure in (("unet_step", f"guided U-Net step {size}"), ("vae_decode", f"VAE decode {size}")):
                alone[(figure, dtype)] = median(result[f"{stage}_s"])
                rows.append((figure, f"sd {dtype}, in its own render", result[f"{stage}_s"], result[f"{stage}_cpu_s"], dtype, cpu))
        elif "not_installed" in result or "failed" in result:
            name = {"openvino": "OpenVINO", "sdcpp": "stable-diffusion.cpp"}[group]
            reason = f"not installed: {result['not_installed']}" if "not_installed" in result else f"failed: {result['failed']}"
            rows.append(("-", f"{name} {result.get('precision', result.get('wtype'))}", reason, None, None, cpu))
        elif group == "openvino":
            name = f"OpenVINO {result['openvino'].split('-')[0]} {result['precision']}"
            conversion = sum(result[f"{model}_{stage}_s"] for model in ("unet_step", "vae_decode") for stage in ("convert", "compile"))
            rows += [(f"guided U-Net step {size}", name, result["unet_step_s"], result["unet_step_cpu_s"], dtype, cpu),
                     (f"VAE decode {size}", name, result["vae_decode_s"], result["vae_decode_cpu_s"], dtype, cpu),
                     ("load", f"{name}: conversion and compilation", conversion, None, dtype, cpu)]
        elif group == "sdcpp":
            name = f"stable-diffusion.cpp {result['stable_diffusion_cpp_python']} {result['wtype']}"
            target = next((other["steps"] for other in results if other["group"] == "peers_generate"), result["steps"])
            # its sampling time scaled to sd's steps: the mean step, and the little the sampling adds per run
            estimate = result["load_s"] + result["text_encoding_s"] + result["sampling_s"] * target / result["steps"] + result["vae_decode_s"]
            rows += [(f"guided U-Net step {size}", name, result["step_s"], result["step_cpu_s"], None, cpu),
                     (f"VAE decode {size}", name, result["vae_decode_s"], None, None, cpu), ("load", name, result["load_s"], None, None, cpu),
                     (f"txt2img {size}, {target} steps Euler, load included", f"{name}, estimated from {result['steps']} steps", estimate, None, None, cpu)]
    order = ("guided U-Net step", "VAE decode", "load", "txt2img", "-")
    rows.sort(key=lambda row: next(index for index, start in enumerate(order) if row[0].startswith(start)))
    first, width = (max((len(row[column]) for row in rows), default=0) for column in (0, 1))
    lines = [f"{'peers: figure':{first}} {'implementation':{width}} {'median (min) s':>16} {'CPU s':>7} {'x sd':>6}  cpu"]
    for figure, name, seconds, cpu_seconds, dtype, cpu in rows:
        if isinstance(seconds, str):
            lines.append(f"{figure:{first}} {name:{width}} {seconds}  {cpu}")
            continue
        text = f"{seconds['median']:.2f} ({seconds['min']:.2f})" if isinstance(seconds, dict) else f"{seconds:.2f}"
        cpu_text = f"{cpu_seconds['median']:.2f}" if cpu_seconds else "-"
        mine = ours if name.startswith(("sd ", "diffusers")) else {**ours, **alone}
        reference = mine.get((figure, dtype)) if dtype else mine.get((figure, "bf16"), mine.get((figure, "fp32")))
        ratio = f"{median(seconds) / reference:6.2f}" if reference else f"{'-':>6}"
        lines.append(f"{figure:{first}} {name:{width}} {text:>16} {cpu_text:>7} {ratio}  {cpu}")
    return lines


def compile_table(results: list[dict]) -> list[str]:
    """The compile group's figures, one line per dtype and mode: the first call's seconds (the compile's: cold, then
    with inductor's cache warm), the step's median (min), its ratio to the eager step on the chosen paths, and the
    process's peak RSS (a frozen graph holds its own packed copy of the weights)."""
    runs = {}
    for result in results:
        runs.setdefault((result["dtype"], result["mode"]), []).append(result)
    eager = {dtype: median(found[0]["unet_step_s"]) for (dtype, mode), found in runs.items() if mode == "chosen"}
    lines = [f"{'compile: guided U-Net step':28} {'first call s, cold; warm':>25} {'median (min) s':>15} {'x chosen':>8} {'peak GiB':>8}  cpu"]
    for (dtype, mode), found in runs.items():
        found.sort(key=lambda result: result["run"])
        step = found[-1]["unet_step_s"]
        ratio = f"{median(step) / eager[dtype]:8.2f}" if dtype in eager else f"{'-':>8}"
        first = "; ".join(f"{result['first_call_s']:.1f}" for result in found)
        name = f"{dtype} {found[-1]['size']}x{found[-1]['size']} {mode}"
        lines.append(f"{name:28} {first:>25} {step['median']:>6.2f} ({step['min']:.2f}) {ratio} {found[-1]['peak_rss_gib']:8.2f}  {found[-1]['cpu']}")
    return lines


def figure_flops(result: dict, figure: str, flops: dict) -> float | None:
    """The floating-point operations behind a wall-time figure, where stage_flops counts them: each component,
    and a hires run's U-Net steps of either pass and its decode (untiled: tiles overlap, which adds work)."""
    if result["group"] == "components":
        return flops.get((figure[:-2], result["size"]))
    if result["group"] != "hires":
        return None
    stages = {"unet_step_s": ("unet_step", result["base"]), "hires_unet_step_s": ("unet_step", result["size"])}
    if not result["tiled"]:
        stages["decode_s"] = ("vae_decode", result["size"])
    return flops.get(stages[figure]) if figure in stages else None


def median(figure) -> float:
    return figure["median"] if isinstance(figure, dict) else figure


def pair_text(figure) -> str:
    if figure is None:
        return "-"
    if isinstance(figure, dict):
        return f"{figure['min']:.2f} / {figure['median']:.2f}"
    return f"{figure:.2f}"


def random_controlnet(folder: Path) -> Path:
    from controlnets import control_params, random_controlnet_state_dict, write_controlnet

    return write_controlnet(random_controlnet_state_dict(control_params(), dtype=torch.float16), folder / "random-controlnet.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    groups = ["load", "components", "turns", "generate"]
    parser.add_argument("--only", nargs="+", default=groups, choices=[*groups, "decode", "hires", "prompts", "controlnet", "lora", "peers", "compile"],
                        help="not run by default: decode (sd's decode alone, untiled and tiled), hires (sd's txt2img at large sizes), prompts (long prompts' cost), "
                             "controlnet (a U-Net step with and without one ControlNet), lora (LoRA merging's cost), "
                             "peers (OpenVINO and stable-diffusion.cpp beside sd and diffusers), compile (sd's U-Net step compiled by inductor)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions of each component and load (default 3; twice as many U-Net steps in turn)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 256], help="image sides for the components; txt2img runs at the largest")
    parser.add_argument("--decode-sizes", nargs="+", type=int, default=[1024, 2048], help="image sides for --only decode (default 1024 2048)")
    parser.add_argument("--decode-tile", type=int, default=64, help="the tiled decode's tile, in latents (default 64: 512 pixels)")
    parser.add_argument("--steps", type=int, default=20, help="txt2img steps (default 20)")
    parser.add_argument("--hires-sizes", nargs="+", type=int, default=[512, 1024, 2048], help="image sides for --only hires (default 512 1024 2048)")
    parser.add_argument("--hires-base", type=int, default=512, help="--only hires: the first pass's side; larger sizes are hires fix from it (default 512)")
    parser.add_argument("--hires-first-steps", type=int, default=2, help="--only hires: the first pass's steps (default 2)")
    parser.add_argument("--hires-steps", type=int, default=1, help="--only hires: the hires pass's steps (default 1)")
    parser.add_argument("--tiled-from", type=int, default=2048, help="--only hires: the smallest side decoded in tiles (default 2048)")
    parser.add_argument("--lora-rank", type=int, default=128, help="--only lora: the LoRA files' rank (default 128: 151 MB in fp16)")
    parser.add_argument("--peer-envs", type=Path, default=ROOT, help="--only peers: the folder of the peers' environments, .venv-openvino and .venv-sdcpp "
                                                                      "(default: the checkout's, where `make peer-envs` puts them)")
    parser.add_argument("--peer-steps", type=int, default=2, help="--only peers: stable-diffusion.cpp's steps, whose times give one step's (default 2)")
    parser.add_argument("--sdcpp-wtypes", nargs="*", default=["f16", "q8_0"],
                        help="--only peers: stable-diffusion.cpp's weight types (default f16 q8_0; none: leave it out, as when only sd's dtype changed)")
    parser.add_argument("--compile-modes", nargs="+", default=list(COMPILE_MODES), choices=COMPILE_MODES,
                        help="--only compile: the steps measured (default all: eager on the chosen paths, eager on the traceable ones, "
                             "inductor's default mode and max-autotune)")
    parser.add_argument("--checkpoints", nargs="+", type=Path, help="an existing .safetensors (and .ckpt) instead of a new random checkpoint")
    parser.add_argument("--controlnet", type=Path, help="--only controlnet: an existing ControlNet file instead of a new random one")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return

    # each figure is a fresh process: the kernel timing (sd/kernels.py) is made and cached here first, so that no
    # figure pays for it
    cpu = torch.device("cpu")
    chosen = {name: kernels.choose_all(compute_dtype(DTYPES[name], cpu)) for name in args.dtypes}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        if args.checkpoints:
            files = {path.suffix: path for path in args.checkpoints}
            if ".safetensors" not in files:
                sys.exit("--checkpoints needs a .safetensors file")
        else:
            from checkpoints import random_sd15_state_dict, write_checkpoint

            state = random_sd15_state_dict(seed=0)
            suffixes = (".safetensors", ".ckpt") if "load" in args.only else (".safetensors",)  # only the load group reads a .ckpt
            files = {suffix: write_checkpoint(state, folder / f"random-sd15{suffix}") for suffix in suffixes}
            del state
        if "controlnet" in args.only and args.controlnet is None:
            args.controlnet = random_controlnet(folder)
        results = []
        for spec in plan(args, files, folder):
            results.append(measure(spec, args.peer_envs))
            print(json.dumps(results[-1]), flush=True)
        psnrs = image_psnrs(folder)
    peaks = next(result for result in results if result["group"] == "peaks")
    peers = [result for result in results if result["group"] in PEER_GROUPS]
    compiled = [result for result in results if result["group"] == "compile"]
    results = merge_results([result for result in results if result["group"] not in (*PEER_GROUPS, "compile")])
    sizes = sorted({result[key] for result in results for key in ("size", "base") if key in result})
    lines = table(results, stage_flops(sizes), peaks) if len(results) > 1 else []  # more than the peaks
    if peers:
        lines += ["", *peers_table(peers)]
    if compiled:
        lines += ["", *compile_table(compiled)]
    lines += load_breakdown(results)
    lines.append(f"matmul peaks: fp32 {peaks['fp32_gflops']:.1f} GFLOP/s, bf16 {peaks['bf16_gflops']:.1f} GFLOP/s")
    lines += [f"PSNR {pair}: {value:.1f} dB" for pair, value in psnrs.items()]
    print("\n" + "\n".join(lines))
    machine = {"cpu": platform.processor() or platform.machine(), "cpu_model": cpu_description(), "cpu_flags": kernels.cpu_flags(),
               "cores": os.cpu_count(), "torch": torch.__version__, "native_bf16": cpu_has_bf16(), "kernels": chosen,
               "kernel_timings": {name: kernels.timings(compute_dtype(DTYPES[name], cpu)) for name in args.dtypes}, "date": time.strftime("%Y-%m-%d")}
    args.output.write_text(json.dumps({"machine": machine, "results": results + peers + compiled, "psnr_db": psnrs, "table": lines}, indent=1))


if __name__ == "__main__":
    main()
