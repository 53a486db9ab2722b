"""Time and memory of loading a VAE file (`--vae`): swap_vae on loaded models, and load_models(vae=...).

Writes a random SD 1.5 VAE (tests/checkpoints.py, seed 1, fp32: 335 MB) as .safetensors and as a .ckpt with the
training's extras, and a checkpoint of the demo model's U-Net and text encoder with SD 1.5's VAE (the VAE's cost
does not depend on the U-Net); each figure is measured in a fresh process. The files were just written, so they
are read from the page cache. Peak RSS: VmHWM (reset through /proc/self/clear_refs) above the RSS before the swap.

    .venv/bin/python benchmarks/vae_file.py
"""

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

MEASURE = """
import gc, sys, time, torch
from sd import load_models
from sd.files.loader import swap_vae

def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) / 2**20  # GiB

host, vae, dtype, mode = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), sys.argv[4]
if mode == "swap":
    models = load_models(host, dtype=dtype)
gc.collect()
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
started = time.perf_counter()
if mode == "swap":
    swap_vae(models, vae)
else:
    models = load_models(host, dtype=dtype, vae=vae)
seconds = time.perf_counter() - started
print(seconds, status("VmHWM:") - before, status("VmRSS:") - before)
"""


def write_files(folder: Path) -> dict[str, Path]:
    import torch
    from checkpoints import random_sd15_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from sd.pipeline import DEMO_CHECKPOINT
    from sd.models.vae import VAEConfig

    prefix = "first_stage_model."
    with safe_open(str(DEMO_CHECKPOINT), "pt") as demo:
        sizes = json.loads(demo.metadata()["sd_config"])
    sizes["vae"] = dataclasses.asdict(VAEConfig())
    rest = {key: value for key, value in load_file(DEMO_CHECKPOINT).items() if not key.startswith(prefix)}
    paths = {name: folder / name for name in ("host.safetensors", "vae.safetensors", "vae.ckpt")}
    save_file({**rest, **random_sd15_state_dict(seed=0, prefix=prefix)}, paths["host.safetensors"], metadata={"sd_config": json.dumps(sizes)})
    vae = random_sd15_state_dict(seed=1, prefix=prefix)
    save_file(vae, paths["vae.safetensors"])
    bare = {key.removeprefix(prefix): value for key, value in vae.items()}
    torch.save({"state_dict": {**bare, "loss.logvar": torch.zeros(()), "model_ema.decay": torch.tensor(0.9999)}}, paths["vae.ckpt"])
    return paths


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        paths = write_files(Path(folder))
        print(f"VAE file: {paths['vae.safetensors'].stat().st_size / 1e6:.0f} MB (.safetensors), {paths['vae.ckpt'].stat().st_size / 1e6:.0f} MB (.ckpt)")
        print("| what | file | dtype | seconds | peak RSS increase (GiB) | RSS increase after (GiB) |\n|---|---|---|---|---|---|")
        for mode in ("swap", "load"):
            for dtype in ("float32", "bfloat16"):
                for name in ("vae.safetensors", "vae.ckpt"):
                    output = subprocess.run([sys.executable, "-c", MEASURE, str(paths["host.safetensors"]), str(paths[name]), dtype, mode],
                                            capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
                    seconds, peak, after = map(float, output[-3:])
                    what = "swap_vae(models, file)" if mode == "swap" else "load_models(host, vae=file)"
                    print(f"| {what} | {name} | {dtype} | {seconds:.2f} | {peak:.3f} | {after:.3f} |", flush=True)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"({time.perf_counter() - started:.0f} s in all)")
