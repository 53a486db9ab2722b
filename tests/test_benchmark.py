"""The benchmark command still runs: full-size random weights, 64x64 images, one repetition, both dtypes.

Only the .safetensors file, to keep this test near 3 minutes: .ckpt loading is covered by test_converter."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "benchmark.py"
STAGES = ("clip_s", "unet_step_s", "vae_decode_s", "vae_encode_s")


def test_benchmark_measures_every_figure_for_both_implementations(checkpoint_files, tmp_path):
    output = tmp_path / "results.json"
    command = [sys.executable, str(BENCHMARK), "--checkpoints", str(checkpoint_files[".safetensors"]),
               "--sizes", "64", "--steps", "2", "--repeat", "1", "--output", str(output)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads(output.read_text())
    results = report["results"]

    peaks = next(r for r in results if r["group"] == "peaks")
    assert peaks["fp32_gflops"] > 0 and peaks["bf16_gflops"] > 0
    for dtype in ("fp32", "bf16"):
        for impl in ("sd", "diffusers"):
            mine = [r for r in results if r.get("dtype") == dtype and r.get("impl") == impl]
            loads = {r["format"]: r for r in mine if r["group"] == "load"}
            assert set(loads) == {".safetensors"}
            assert all(r["load_s"]["min"] > 0 and r["peak_rss_gib"] > 0 for r in loads.values())
            components = next(r for r in mine if r["group"] == "components")
            assert all(components[stage]["median"] > 0 for stage in STAGES)
            generated = next(r for r in mine if r["group"] == "generate")
            # one U-Net call per step
            assert generated["total_s"] > 0 and generated["unet_step_s"]["runs"] == 2
            turns = next(r for r in mine if r["group"] == "turns")
            assert turns["unet_step_s"]["runs"] == 2 and turns["unet_step_s"]["median"] > 0
        ratios = next(r for r in results if r["group"] == "turns" and r["dtype"] == dtype and r["impl"] == "sd")["ratio_of_turns"]
        assert ratios["runs"] == 2 and ratios["median"] > 0
    # same seed and weights: the images must agree (DDPM draws the same noise on both sides)
    assert report["psnr_db"]["sd-fp32 vs diffusers-fp32"] > 40
    assert report["psnr_db"]["sd-fp32 vs sd-bf16"] > 0
    table = "\n".join(report["table"])
    assert "sd/diff" in table and "fp32 64x64" in table and "steps in turn" in table and "PSNR sd-fp32 vs sd-bf16" in finished.stdout
