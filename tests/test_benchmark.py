"""The benchmark command still runs: full-size random weights, 64x64 images, one repetition.

Every figure of sd against diffusers in fp32; in bf16 the U-Net steps in turn, the figure the targets are
set on. Every group runs the same code in either dtype but for the models' loading, which the turns run too:
with bf16 instructions both sides compute bf16, without them sd stores bf16 and computes fp32 and diffusers is
given the same by its layerwise casting. (The other groups took 37 s more in bf16 on a Zen 4, and minutes without bf16
instructions.) Only the .safetensors file: .ckpt loading is covered by test_converter. sd's own groups
(decode, hires, prompts) run on the demo model's small weights."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

from sd import kernels
from sd.pipeline import DEMO_CHECKPOINT

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "benchmark.py"
STAGES = ("clip_s", "unet_step_s", "vae_decode_s", "vae_encode_s")


def run_benchmark(output: Path, *options) -> tuple[dict, str]:
    """The benchmark command's report (results.json) and its printed output."""
    command = [sys.executable, str(BENCHMARK), *map(str, options), "--output", str(output)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(output.read_text()), finished.stdout


def test_benchmark_measures_every_figure_for_both_implementations(safetensors_checkpoint, tmp_path):
    report, printed = run_benchmark(tmp_path / "results.json", "--checkpoints", safetensors_checkpoint, "--dtypes", "fp32",
                                    "--sizes", 64, "--steps", 2, "--repeat", 1)
    results = report["results"]

    peaks = next(r for r in results if r["group"] == "peaks")
    assert peaks["fp32_gflops"] > 0 and peaks["bf16_gflops"] > 0
    for impl in ("sd", "diffusers"):
        mine = [r for r in results if r.get("dtype") == "fp32" and r.get("impl") == impl]
        loads = {r["format"]: r for r in mine if r["group"] == "load"}
        assert set(loads) == {".safetensors"}
        assert all(r["load_s"]["min"] > 0 and r["peak_rss_gib"] > 0 for r in loads.values())
        run, = loads[".safetensors"]["runs"]
        assert run["load_cpu_s"] > 0 and run["minor_faults"] > 0 and run["disk_read_gib"] >= 0
        if impl == "sd":  # its parts within the whole (pack_weights 0 s where packing was not chosen)
            assert 0 < run["read_checkpoint_s"] + run["convert_s"] + run["pack_weights_s"] <= run["load_s"]
        components = next(r for r in mine if r["group"] == "components")
        assert all(components[stage]["median"] > 0 for stage in STAGES)
        generated = next(r for r in mine if r["group"] == "generate")
        # one U-Net call per step
        assert generated["total_s"] > 0 and generated["unet_step_s"]["runs"] == 2
        assert_turns(mine, runs=2)
    ratios = next(r for r in results if r["group"] == "turns" and r["impl"] == "sd")["ratio_of_turns"]
    assert ratios["runs"] == 2 and ratios["median"] > 0
    # same seed and weights: the images must agree (DDPM draws the same noise on both sides)
    assert report["psnr_db"]["sd-fp32 vs diffusers-fp32"] > 40
    table = "\n".join(report["table"])
    assert "sd/diff" in table and "fp32 64x64" in table and "steps in turn" in table and "PSNR sd-fp32 vs diffusers-fp32" in printed
    assert "sd fp32 load .safetensors, fastest run: " in printed and "GiB read from disk" in printed
    # the kernel choices each figure ran, with the seconds of every path timed for them on this CPU
    chosen, timings = report["machine"]["kernels"]["fp32"], report["machine"]["kernel_timings"]["fp32"]
    timed = [name for name in kernels.CHOICES if len(kernels.candidates(name, torch.float32)) > 1]
    assert {name: timings[name]["path"] for name in timed} == {name: chosen[name] for name in timed}
    assert all(set(timings[name]["seconds"]) == set(kernels.CHOICES[name]) for name in timed)


def assert_turns(results: list[dict], runs: int) -> None:
    turns = next(r for r in results if r["group"] == "turns")
    assert turns["unet_step_s"]["runs"] == runs and turns["unet_step_s"]["median"] > 0


def test_bf16_steps_in_turn(safetensors_checkpoint, tmp_path):
    """sd's bf16 against diffusers' (in bf16 with bf16 instructions, by apply_layerwise_casting without them: see
    load_diffusers), through U-Net steps of each in turn."""
    report, printed = run_benchmark(tmp_path / "results.json", "--checkpoints", safetensors_checkpoint, "--only", "turns", "--dtypes", "bf16",
                                    "--sizes", 64, "--repeat", 1)
    for impl in ("sd", "diffusers"):
        assert_turns([r for r in report["results"] if r.get("impl") == impl and r.get("dtype") == "bf16"], runs=2)
    assert "bf16 64x64 steps in turn" in printed


def timed(result: dict, figure: str, runs: int) -> bool:
    """Whether `figure` has `runs` runs of positive wall and CPU seconds."""
    return all(result[f"{figure}{kind}"]["runs"] == runs and result[f"{figure}{kind}"]["min"] > 0 for kind in ("_s", "_cpu_s"))


def test_benchmark_measures_sds_own_groups_on_the_demo_model(tmp_path):
    """decode, hires, prompts and lora measure sd alone, so the demo model's small weights do for their code paths."""
    report, printed = run_benchmark(
        tmp_path / "results.json", "--checkpoints", DEMO_CHECKPOINT, "--only", "decode", "hires", "prompts", "lora", "--dtypes", "fp32",
        "--repeat", 1, "--sizes", 64, "--decode-sizes", 64, "--decode-tile", 8, "--lora-rank", 4,
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
        assert result["diffusion_computed_in"] == result["decoder_computed_in"] == "float32"
    assert "hires_unet_step_s" not in plain and timed(hires, "hires_unet_step", 1)

    prompts = next(r for r in results if r["group"] == "prompts")
    for figure in ("encode_1_chunks", "encode_3_chunks", "unet_step_77_tokens", "unet_step_231_tokens"):
        assert timed(prompts, figure, 1)
    assert "fp32 txt2img 128x128, hires fix: 2 steps at 64, 1 at 128, tiled decode" in printed

    lora = next(r for r in results if r["group"] == "lora")
    for figure in ("apply_1", "remove_1", "apply_3", "remove_3", "unet_step", "unet_step_3_loras"):
        assert timed(lora, figure, 1)
    assert lora["lora_file_mb"] > 0 and lora["peak_rss_step_3_loras_gib"] >= lora["rss_after_load_gib"] > 0
    assert "fp32 LoRA rank 4, U-Net at 64x64" in printed


def load_benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peers_group_reports_peers_it_cannot_run(tmp_path):
    """Without the peers' environments, or with one whose install failed or whose run fails, the peers group gives a row
    saying so beside the CPU, not an error of the run (the peers themselves are measured by `make bench-peers` only)."""
    benchmark = load_benchmark_module()
    openvino = dict(group="openvino", dtype="bf16", precision="bf16", size=64, repeat=1, checkpoint="unused.safetensors")
    sdcpp = dict(group="sdcpp", wtype="q8_0", size=64, steps=2, checkpoint="unused.safetensors")
    log = tmp_path / "build" / "peers" / "sdcpp-install.log"
    log.parent.mkdir(parents=True)
    log.write_text("compiling...\nerror: no C++ compiler\n")
    missing, failed_install = benchmark.measure(openvino, tmp_path), benchmark.measure(sdcpp, tmp_path)
    assert "`make peer-envs` installs it" in missing["not_installed"]
    assert failed_install["not_installed"].endswith("ends: error: no C++ compiler")

    environment = tmp_path / ".venv-openvino"
    (environment / "bin").mkdir(parents=True)
    (environment / "installed").touch()
    python = environment / "bin" / "python"
    python.write_text("#!/bin/sh\necho 'RuntimeError: no CPU plugin' >&2\nexit 1\n")
    python.chmod(0o755)
    failed = benchmark.measure(openvino, tmp_path)
    assert failed["failed"] == "RuntimeError: no CPU plugin"

    lines = benchmark.peers_table([missing, failed_install, failed])
    assert len(lines) == 4 and all(benchmark.CPU_LABEL in line for line in lines[1:])
    assert "OpenVINO bf16" in lines[1] and "not installed: no " in lines[1] and "stable-diffusion.cpp q8_0" in lines[2]
    assert "failed: RuntimeError: no CPU plugin" in lines[3]


def test_peers_table_compares_each_peer_with_sd_measured_as_it_was():
    """diffusers shares sd's process, so its ratio is to sd's step there; OpenVINO runs in a process of its own, so its
    ratio is to sd's step in sd's own render."""
    benchmark = load_benchmark_module()
    cpu = benchmark.CPU_LABEL
    timing = lambda seconds: {"min": seconds, "median": seconds, "runs": 1}
    shared = dict(group="peers_torch", dtype="bf16", size=512, cpu=cpu,
                  **{f"{impl}_{stage}_{kind}": timing(seconds) for impl, seconds in (("sd", 5.0), ("diffusers", 6.0), ("diffusers_channels_last", 7.0))
                     for stage in ("unet_step", "vae_decode") for kind in ("s", "cpu_s")})
    render = dict(group="peers_generate", dtype="bf16", size=512, steps=20, cpu=cpu, load_s=2.0, generate_s=90.0,
                  **{f"{stage}_{kind}": timing(4.0) for stage in ("unet_step", "vae_decode") for kind in ("s", "cpu_s")})
    openvino = dict(group="openvino", dtype="bf16", precision="bf16", size=512, cpu=cpu, openvino="2026.4.1-build",
                    **{f"{stage}_{kind}": timing(4.4) for stage in ("unet_step", "vae_decode") for kind in ("s", "cpu_s")},
                    **{f"{stage}_{step}_s": 1.0 for stage in ("unet_step", "vae_decode") for step in ("convert", "compile")})
    lines = benchmark.peers_table([shared, render, openvino])
    ratio = lambda figure, name: next(line.split(cpu)[0].split()[-1] for line in lines if line.startswith(figure) and name in line)
    assert ratio("guided U-Net step", "OpenVINO") == "1.10"  # 4.4 / 4.0
    assert ratio("VAE decode", "OpenVINO") == "1.10"
    assert ratio("guided U-Net step", "diffusers eager") == "1.20"  # 6.0 / 5.0
    assert ratio("guided U-Net step", "own render") == "0.80"  # 4.0 / 5.0


def test_compile_group_measures_eager_steps_on_the_demo_model(tmp_path):
    """The compile group's eager steps, on the chosen paths and on the ones inductor traces, and its table. Its compiled
    modes are measured by `benchmark.py --only compile` alone: on the demo model they take 4 minutes, most of it
    inductor's compiling."""
    report, printed = run_benchmark(tmp_path / "results.json", "--checkpoints", DEMO_CHECKPOINT, "--only", "compile", "--dtypes", "fp32",
                                    "--sizes", 64, "--repeat", 1, "--compile-modes", "chosen", "traceable")
    steps = {r["mode"]: r for r in report["results"] if r["group"] == "compile"}
    assert set(steps) == {"chosen", "traceable"}
    assert all(timed(r, "unet_step", 1) and r["first_call_s"] > 0 for r in steps.values())
    benchmark = load_benchmark_module()
    assert steps["traceable"]["paths"] == kernels.forced_paths(benchmark.TRACEABLE_PATHS)
    lines = {line.split()[2]: line for line in printed.splitlines() if line.startswith("fp32 64x64 ")}
    assert set(lines) == {"chosen", "traceable"} and " 1.00 " in lines["chosen"]
    ratio = steps["traceable"]["unet_step_s"]["median"] / steps["chosen"]["unet_step_s"]["median"]
    assert f" {ratio:.2f} " in lines["traceable"] and benchmark.CPU_LABEL in lines["traceable"]
