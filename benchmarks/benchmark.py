"""sd against diffusers on the same random full-size SD 1.5 weights, each measurement in a fresh process.

    .venv/bin/python benchmarks/benchmark.py                  # everything, fp32 and bf16
    .venv/bin/python benchmarks/benchmark.py --only load      # one group: load, generate
    .venv/bin/python benchmarks/benchmark.py --size 256 --steps 4 --dtypes bf16   # quicker

Writes the checkpoint to a temporary folder, prints a table with the ratio sd/diffusers and
writes every figure to benchmarks/results.json. diffusers' `from_single_file` needs files from
a model hub, so its models are built from the same tensors by its own single-file converters
(on the meta device, the fastest way it offers), with its default (SDPA) attention.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ["HF_HUB_OFFLINE"] = "1"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_rss_gib() -> float:
    """This process's peak resident memory. VmHWM rather than getrusage: a child's ru_maxrss
    starts from its parent's at fork, and our parent held the whole checkpoint when writing it."""
    status = Path("/proc/self/status").read_text()
    kilobytes = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return kilobytes / 2**20


# ---- workers: each runs in its own process and prints one JSON line ----


def load_sd(checkpoint: Path, dtype: torch.dtype):
    from sd import load_models

    return load_models(checkpoint, dtype=dtype)


def load_diffusers(checkpoint: Path, dtype: torch.dtype):
    from reference import reference_pipeline

    from diffusers import DDPMScheduler

    pipe = reference_pipeline(checkpoint, DDPMScheduler.from_config(SD15_SCHEDULER), plain_attention=False)
    return pipe.to(dtype=dtype)


SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True,
)


def time_calls(module: torch.nn.Module, record: list[float]) -> None:
    """Appends the duration of every forward call of `module` to `record`."""
    starts = []
    module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
    module.register_forward_hook(lambda *_: record.append(time.perf_counter() - starts.pop()))


def worker_load(impl: str, checkpoint: Path, dtype: torch.dtype, **_) -> dict:
    start = time.perf_counter()
    models = (load_sd if impl == "sd" else load_diffusers)(checkpoint, dtype)
    seconds = time.perf_counter() - start
    del models
    return {"load_s": seconds}


def worker_generate(impl: str, checkpoint: Path, dtype: torch.dtype, size: int, steps: int, strength: float | None, **_) -> dict:
    from PIL import Image

    prompt, seed = "a photograph of an astronaut riding a horse", 0
    image = Image.new("RGB", (size, size), (90, 140, 200)) if strength else None
    unet_seconds: list[float] = []
    if impl == "sd":
        from sd import generate

        models = load_sd(checkpoint, dtype)
        time_calls(models["diffusion"], unet_seconds)
        start = time.perf_counter()
        generate(prompt, input_image=image, strength=strength or 0.8, steps=steps, seed=seed, width=size, height=size, models=models, progress=False)
    else:
        pipe = load_diffusers(checkpoint, dtype)
        time_calls(pipe.unet, unet_seconds)
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        if image is None:
            pipe(prompt, num_inference_steps=steps, height=size, width=size, generator=generator, output_type="np")
        else:
            from diffusers import StableDiffusionImg2ImgPipeline

            img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
            img2img(prompt, image=image, strength=strength, num_inference_steps=steps, generator=generator, output_type="np")
    total = time.perf_counter() - start
    return {"total_s": total, "unet_step_s": sorted(unet_seconds)[len(unet_seconds) // 2], "unet_steps": len(unet_seconds)}


def timed(function, repeat: int) -> dict:
    """Min and median seconds of `repeat` calls, after one warm-up call (which pages the weights in)."""
    function()
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    seconds.sort()
    return {"min": seconds[0], "median": seconds[len(seconds) // 2]}


def worker_components(impl: str, checkpoint: Path, dtype: torch.dtype, size: int, repeat: int, **_) -> dict:
    """Each stage alone: text encoding, one guided U-Net step (batch 2), VAE decode and encode (batch 1)."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, size // 8, size // 8, generator=generator).to(dtype)
    context = torch.randn(2, 77, 768, generator=generator).to(dtype)
    image = (torch.rand(1, 3, size, size, generator=generator) * 2 - 1).to(dtype)
    tokens = torch.randint(0, 49406, (2, 77), generator=generator)
    if impl == "sd":
        models = load_sd(checkpoint, dtype)
        stages = {
            "clip": lambda: models["clip"](tokens),
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
    return {f"{stage}_s": timed(function, repeat) for stage, function in stages.items()}


WORKERS = {"load": worker_load, "generate": worker_generate, "components": worker_components}


def run_worker(spec: dict) -> dict:
    spec = {**spec, "checkpoint": Path(spec["checkpoint"]), "dtype": DTYPES[spec["dtype"]]}
    torch.manual_seed(0)
    with torch.inference_mode():
        result = WORKERS[spec["group"]](**spec)
    return {**result, "peak_rss_gib": peak_rss_gib()}


# ---- the driver ----


def measure(spec: dict) -> dict:
    """Runs one worker in a fresh process, so that each peak RSS is its own."""
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode:
        sys.exit(f"{spec} failed:\n{finished.stderr}")
    return {**spec, **json.loads(finished.stdout.strip().splitlines()[-1])}


def plan(args, files: dict[str, Path]) -> list[dict]:
    specs = []
    for dtype in args.dtypes:
        for impl in ("sd", "diffusers"):
            if "load" in args.only:
                for suffix, path in files.items():
                    specs.append(dict(group="load", impl=impl, dtype=dtype, format=suffix, checkpoint=str(path)))
            if "components" in args.only:
                specs.append(dict(group="components", impl=impl, dtype=dtype, size=args.size, repeat=args.repeat, checkpoint=str(files[".safetensors"])))
            if "generate" in args.only:
                for strength in (None, 0.6):
                    specs.append(dict(group="generate", impl=impl, dtype=dtype, size=args.size, steps=args.steps, strength=strength, checkpoint=str(files[".safetensors"])))
    return specs


def row_key(result: dict) -> tuple:
    return tuple((k, v) for k, v in result.items() if k in ("group", "dtype", "format", "size", "steps", "strength"))


def median(figure):
    """A figure, or the median of a timed one."""
    return figure["median"] if isinstance(figure, dict) else figure


def print_table(results: list[dict]) -> None:
    by_key = {}
    for result in results:
        by_key.setdefault(row_key(result), {})[result["impl"]] = result
    print(f"\n{'measurement':52} {'figure':12} {'sd':>9} {'diffusers':>10} {'sd/diff':>8}  (medians)")
    for key, pair in by_key.items():
        label = " ".join(f"{v}" for k, v in key if v is not None and k != "group")
        label = f"{dict(key)['group']} {label}"
        for figure in pair.get("sd", {}):
            if figure.endswith(("_s", "_gib")):
                ours, theirs = (median(side.get(figure)) for side in (pair["sd"], pair.get("diffusers", {})))
                reference = f"{theirs:10.2f} {ours / theirs:8.2f}" if theirs else f"{'-':>10}"
                print(f"{label:52} {figure:12} {ours:9.2f} {reference}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="+", default=list(WORKERS), choices=list(WORKERS))
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions of each component")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return

    from checkpoints import random_sd15_state_dict, write_checkpoint

    with tempfile.TemporaryDirectory() as folder:
        state = random_sd15_state_dict(seed=0)
        files = {suffix: write_checkpoint(state, Path(folder) / f"random-sd15{suffix}") for suffix in (".safetensors", ".ckpt")}
        del state
        results = []
        for spec in plan(args, files):
            results.append(measure(spec))
            print(json.dumps(results[-1]), flush=True)
    print_table(results)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    args.output.write_text(json.dumps({"machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
