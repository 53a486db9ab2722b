"""The benchmark command still runs: full-size random weights, 64x64 images, one repetition, both dtypes.

Only the .safetensors file, to keep this test near 3 minutes: .ckpt loading is covered by test_converter."""

import json
import subprocess
import sys
from pathlib import Path

from sd.pipeline import DEMO_CHECKPOINT

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "benchmark.py"
STAGES = ("clip_s", "unet_step_s", "vae_decode_s", "vae_encode_s")


def run_benchmark(output: Path, *options) -> tuple[dict, str]:
    """The benchmark command's report (results.json) and its printed output."""
    command = [sys.executable, str(BENCHMARK), *map(str, options), "--output", str(output)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(output.read_text()), finished.stdout


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


def timed(result: dict, figure: str, runs: int) -> bool:
    """Whether `figure` has `runs` runs of positive wall and CPU seconds."""
    return all(result[f"{figure}{kind}"]["runs"] == runs and result[f"{figure}{kind}"]["min"] > 0 for kind in ("_s", "_cpu_s"))


def test_benchmark_measures_sds_own_groups_on_the_demo_model(tmp_path):
    """decode, hires and prompts measure sd alone, so the demo model's small weights do for their code paths."""
    report, printed = run_benchmark(
        tmp_path / "results.json", "--checkpoints", DEMO_CHECKPOINT, "--only", "decode", "hires", "prompts", "--dtypes", "fp32",
        "--repeat", 1, "--sizes", 64, "--decode-sizes", 64, "--decode-tile", 8,
        "--hires-base", 64, "--hires-sizes", 64, 128, "--tiled-from", 128, "--hires-first-steps", 2, "--hires-steps", 1)
    results = report["results"]
    assert all(len(r["loadavg_before"]) == len(r["loadavg_after"]) == 3 for r in results)

    decodes = {r["tiled"]: r for r in results if r["group"] == "decode"}
    assert set(decodes) == {False, True}
    assert all(timed(r, "decode", 1) and r["peak_rss_gib"] >= r["rss_before_gib"] > 0 for r in decodes.values())

    plain, hires = sorted((r for r in results if r["group"] == "hires"), key=lambda r: r["size"])
    assert (plain["size"], plain["tiled"], hires["size"], hires["tiled"]) == (64, False, 128, True)
    for result in (plain, hires):
        assert timed(result, "total", 1) and timed(result, "unet_step", 2) and timed(result, "decode", 1)
        assert result["peak_rss_gib"] >= result["rss_before_gib"] > 0 and result["load_peak_rss_gib"] > 0
    assert "hires_unet_step_s" not in plain and timed(hires, "hires_unet_step", 1)

    prompts = next(r for r in results if r["group"] == "prompts")
    for figure in ("encode_1_chunks", "encode_3_chunks", "unet_step_77_tokens", "unet_step_231_tokens"):
        assert timed(prompts, figure, 1)
    assert "fp32 txt2img 128x128, hires fix: 2 steps at 64, 1 at 128, tiled decode" in printed
