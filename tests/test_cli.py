"""The `sd` command: in-process through click's CliRunner, and as the installed console script.

Images are 64x64 with 2 steps (and batches without guidance, --cfg 1) so that a render of the full-size
random checkpoint takes seconds; the in-process runs share one model load (the pipeline keeps the last
checkpoint loaded).
"""

import argparse
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

import cli
from sd.files import hashes

SMALL = ["--width", "64", "--height", "64", "--steps", "2"]
SD_SCRIPT = shutil.which("sd", path=str(Path(sys.executable).parent)) or shutil.which("sd")
CHECKPOINT_HINT = "v1-5-pruned-emaonly.safetensors from the Stable Diffusion 1.5 release"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One hash cache for the whole module, so the 4 GB checkpoint is hashed by the CLI once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def environment(monkeypatch, tmp_path, cache_dir):
    monkeypatch.setenv("SD_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SD_CHECKPOINT", raising=False)
    monkeypatch.chdir(tmp_path)  # the default outputs/ folder lands in the test's own folder


@pytest.fixture(scope="module")
def checkpoint_sha256(safetensors_checkpoint) -> str:
    digest = hashlib.sha256()
    with open(safetensors_checkpoint, "rb") as file:
        for chunk in iter(lambda: file.read(16 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sd(*args):
    return CliRunner().invoke(cli.main, ["generate", *map(str, args)], prog_name="sd")


def sd_process(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([SD_SCRIPT, "generate", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)


def read_parameters(path: Path) -> dict[str, str]:
    """Parses AUTOMATIC1111's `parameters` text: the prompt line, an optional negative prompt line, the fields."""
    lines = Image.open(path).text["parameters"].split("\n")
    assert len(lines) in (2, 3), lines
    fields = dict(field.split(": ", 1) for field in lines[-1].split(", "))
    fields["prompt"] = lines[0]
    if len(lines) == 3:
        assert lines[1].startswith("Negative prompt: ")
        fields["negative"] = lines[1].removeprefix("Negative prompt: ")
    return fields


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def assert_clean_failure(result, expected: str):
    assert result.exit_code == 2, result.output  # an unexpected exception would give 1
    assert expected in result.output
    assert "Traceback" not in result.output


# Bad input that must be refused before the models load: the checkpoint given is not one, so getting
# the expected message (and not a checkpoint error) shows that the check came first.
@pytest.mark.parametrize(
    "args, expected",
    [
        ([], "give either --prompt TEXT or --prompts-file FILE"),
        (["--prompt", "x", "--prompts-file", "prompts.txt"], "give either --prompt TEXT or --prompts-file FILE"),
        (["--prompt", "x", "--strength", "0"], "'--strength': 0.0 is not in the range 0<x<=1"),
        (["--prompt", "x", "--strength", "1.5"], "'--strength': 1.5 is not in the range 0<x<=1"),
        (["--prompt", "x", "--width", "100"], "error: width must be a multiple of 8 and at least 64, got 100: try 96"),
        (["--prompt", "x", "--height", "56"], "error: height must be a multiple of 8 and at least 64, got 56: try 64"),
        (["--prompt", "x", "--width", "100000", "--height", "100000"], "error: 100000x100000 needs about"),
        (["--prompt", "x", "--steps", "0"], "'--steps': 0 is not in the range x>=1"),
        (["--prompt", "x", "--cfg", "-1"], "'--cfg': -1.0 is not in the range x>=0"),
        (["--prompt", "x", "--sampler", "nope"], "'--sampler': 'nope' is not"),
        (["--prompt", "x", "--steps", "1000"], "error: steps must be between 1 and 999, got 1000"),
        (["--prompt", "x", "--sampler", "pndm", "--karras"], "error: karras sigmas need a sampler that walks noise levels"),
        (["--prompt", "x", "--sampler", "euler", "--eta", "0.3"], "error: eta applies to the ddim sampler only"),
        (["--prompt", "x", "--seed", "-2"], "'--seed': -2 is not in the range"),
        (["--prompt", "x", "--seed", "18446744073709551615", "--num-images", "2"],
         "error: --seed 18446744073709551615 for 2 images needs seeds up to 18446744073709551616, beyond the largest "
         "(18446744073709551615): give one of at most 18446744073709551614"),
        (["--prompt", "x", "--num-images", "1000000000"],
         "error: 1000000000 images (1 prompt x 1000000000) are more than the 100000 one command renders: split the batch into several commands"),
        (["--prompt", "x", "--output", "a.png", "--outdir", "b"], "give --output FILE or --outdir DIR, not both"),
        (["--prompt", "x", "--output", "a.jpg"], "a.jpg must end in .png"),
        (["--prompt", "x", "--input", "prompts.txt"], "error: --input prompts.txt is not an image"),
        (["--prompt", "x", "--input", "missing.png"], "'--input': File 'missing.png' does not exist"),
        (["--prompts-file", "comments.txt"], "error: no prompts in comments.txt"),
        (["--prompt", "x", "--outdir", "prompts.txt/images"], "error: cannot create the output folder prompts.txt/images"),
        (["--prompt", "x", "--output", "existing.png"], "error: existing.png exists: pass --overwrite"),
        (["--prompt", "x", "--hires-scale", "0"], "error: hires scale must be a number more than 0, got 0.0"),
        (["--prompt", "x", "--width", "64", "--height", "64", "--hires-scale", "1.3"],
         "error: hires scale 1.3 makes 64x64 into 83x83, and sizes must be multiples of 8 of at least 64: try hires scale 1.25"),
        (["--prompt", "x", "--hires-width", "100"], "error: hires width must be a multiple of 8 and at least 64, got 100: try 96"),
        (["--prompt", "x", "--hires-scale", "2", "--hires-strength", "1.5"], "'--hires-strength': 1.5 is not in the range 0<x<=1"),
        (["--prompt", "x", "--hires-scale", "2", "--hires-upscaler", "nonsense"], "'--hires-upscaler': 'nonsense' is not one of 'latent'"),
        (["--prompt", "x", "--hires-scale", "2", "--input", "prompts.txt"], "error: hires fix is text-to-image only"),
    ],
)
def test_bad_input_is_refused_before_loading(tmp_path, args, expected):
    Path("not-a-checkpoint.safetensors").write_bytes(b"\0" * 100)
    Path("prompts.txt").write_text("a cat\n")
    Path("comments.txt").write_text("# only a comment\n\n   \n")
    Path("existing.png").write_bytes(b"keep me")
    before = sorted(tmp_path.rglob("*"))
    result = sd(*args, "--checkpoint", "not-a-checkpoint.safetensors")
    assert_clean_failure(result, expected)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written...
    assert Path("existing.png").read_bytes() == b"keep me"  # ...nor overwritten


def test_missing_checkpoint_says_where_to_get_and_put_it(tmp_path, monkeypatch):
    assert_clean_failure(sd("--prompt", "x", "--checkpoint", "missing.safetensors"), "error: checkpoint not found: missing.safetensors")
    monkeypatch.setenv("SD_CHECKPOINT", str(tmp_path / "also-missing.ckpt"))
    result = sd("--prompt", "x")
    assert_clean_failure(result, f"checkpoint not found: {tmp_path / 'also-missing.ckpt'}")
    assert CHECKPOINT_HINT in result.output and "data/" in result.output and "SD_CHECKPOINT" in result.output


def test_version_and_an_unknown_option_of_sd_itself():
    from importlib.metadata import version

    result = CliRunner().invoke(cli.main, ["--version"], prog_name="sd")
    assert result.exit_code == 0 and result.output == f"sd {version('sd')}\n"
    for args, expected in ((["--bogus"], "error: No such option '--bogus'. (see sd --help)"),
                           (["generate", "--bogus"], "error: No such option '--bogus'. (see sd generate --help)")):
        result = CliRunner().invoke(cli.main, args, prog_name="sd")
        assert result.exit_code == 2 and result.output == expected + "\n", result.output


def test_an_image_too_large_for_pillow_is_one_line(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save("big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels, more than twice that: Pillow's decompression bomb
    reason = "Image size (4096 pixels) exceeds limit of 2000 pixels"
    assert_clean_failure(sd("--prompt", "x", "--input", "big.png"), f"error: --input big.png is too large to read: {reason}: give a smaller image\n")
    result = CliRunner().invoke(cli.main, ["info", "big.png"], prog_name="sd")
    assert result.exit_code == 2 and result.output == f"error: big.png is too large to read: {reason}\n", result.output


def test_unavailable_device_is_refused():
    unavailable = [name for name, available in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available())) if not available]
    if not unavailable:
        pytest.skip("every device is available here")
    assert_clean_failure(sd("--prompt", "x", "--device", unavailable[0]), f"error: device {unavailable[0]} is not available")


def bad_checkpoints(folder: Path) -> dict[str, tuple[Path, str]]:
    """Files that are not usable SD 1.x checkpoints -> (path, what the error says)."""
    torch.save({"state_dict": {"x": torch.zeros(1000)}}, folder / "whole.ckpt")
    data = (folder / "whole.ckpt").read_bytes()
    (folder / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    save_file({"x": torch.zeros(1000)}, folder / "whole.safetensors")
    data = (folder / "whole.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (folder / "empty.safetensors").write_bytes(b"")
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hyper_parameters": argparse.Namespace(lr=1e-4)}, folder / "pickled.ckpt")
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(4)}, folder / "sdxl.safetensors")
    return {
        "truncated .ckpt": (folder / "truncated.ckpt", "truncated"),
        "truncated .safetensors": (folder / "truncated.safetensors", "truncated"),
        "empty .safetensors": (folder / "empty.safetensors", "truncated"),
        "pickle with more than tensors": (folder / "pickled.ckpt", "it would call argparse.Namespace, and a checkpoint must hold only tensors"),
        "SDXL": (folder / "sdxl.safetensors", "this is an SDXL checkpoint, not SD 1.x"),
        "not SD at all": (folder / "whole.safetensors", "not an SD 1.x checkpoint: tensors"),
    }


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    for name, (path, expected) in bad_checkpoints(tmp_path).items():
        result = sd("--prompt", "x", "--checkpoint", path, "--outdir", "out", "--seed", 1, *SMALL)
        assert_clean_failure(result, expected)
        assert CHECKPOINT_HINT in result.output, name
        assert not Path("out").exists() or not any(Path("out").iterdir()), name


def test_the_installed_script_fails_cleanly(tmp_path):
    (tmp_path / "existing.png").write_bytes(b"keep me")
    paths = bad_checkpoints(tmp_path)
    truncated = sd_process("--prompt", "x", "--checkpoint", paths["truncated .safetensors"][0], "--seed", 1, cwd=tmp_path)
    existing = sd_process("--prompt", "x", "--checkpoint", paths["truncated .safetensors"][0], "--output", "existing.png", cwd=tmp_path)
    for process, expected in ((truncated, "truncated"), (existing, "existing.png exists")):
        assert process.returncode == 2
        assert process.stderr.startswith("error: ") and expected in process.stderr
        assert len(process.stderr.splitlines()) == 1 and "Traceback" not in process.stderr + process.stdout
    assert (tmp_path / "existing.png").read_bytes() == b"keep me"


def test_generate_writes_a_png_with_its_settings(safetensors_checkpoint, checkpoint_sha256, cache_dir, monkeypatch):
    args = ["--prompt", "a photo of a cat", "--negative-prompt", "blurry", "--seed", 42, "--sampler", "ddpm", "--checkpoint", safetensors_checkpoint, *SMALL]
    result = sd(*args, "--output", "cat.png")
    assert result.exit_code == 0, result.output
    assert "saved cat.png" in result.stdout
    assert re.search(r"^sampled 1 image in \d+\.\d s$", result.stderr, re.M), result.stderr
    assert Image.open("cat.png").size == (64, 64)
    assert read_parameters(Path("cat.png")) == {
        "prompt": "a photo of a cat", "negative": "blurry", "Steps": "2", "Sampler": "DDPM", "CFG scale": "7.5",
        "Seed": "42", "Size": "64x64", "Model hash": checkpoint_sha256[:10], "Model": safetensors_checkpoint.stem,
    }
    assert str(safetensors_checkpoint.resolve()) in (cache_dir / "model_hashes.json").read_text()

    # The same seed again gives the same pixels, and the hash now comes from the cache.
    monkeypatch.setattr(hashes, "_hash_file", lambda path, start: pytest.fail("the checkpoint was hashed again"))
    assert sd(*args, "--output", "again.png").exit_code == 0
    assert np.array_equal(pixels(Path("again.png")), pixels(Path("cat.png")))
    assert read_parameters(Path("again.png"))["Model hash"] == checkpoint_sha256[:10]

    # An existing file is kept unless --overwrite is given.
    before = Path("cat.png").read_bytes(), Path("cat.png").stat().st_mtime_ns
    assert_clean_failure(sd(*args, "--seed", 43, "--output", "cat.png"), "error: cat.png exists: pass --overwrite")
    assert (Path("cat.png").read_bytes(), Path("cat.png").stat().st_mtime_ns) == before
    result = sd(*args, "--seed", 43, "--output", "cat.png", "--overwrite")
    assert result.exit_code == 0, result.output
    assert read_parameters(Path("cat.png"))["Seed"] == "43"
    assert not np.array_equal(pixels(Path("cat.png")), pixels(Path("again.png")))


def test_image_to_image_with_a_random_seed(safetensors_checkpoint, tmp_path):
    gradient = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
    Image.fromarray(gradient).save("input.png")
    result = sd("--prompt", "a painting", "--input", "input.png", "--strength", 0.5, "--num-images", 2,
                "--sampler", "dpmpp_2m", "--karras", "--output", "painting.png", "--checkpoint", safetensors_checkpoint, *SMALL)
    assert result.exit_code == 0, result.output
    seed = int(result.stderr.split("seed: ", 1)[1].split()[0])
    assert re.search(r"^sampled 2 images in \d+\.\d s \(\d+\.\d s each\)$", result.stderr, re.M), result.stderr
    assert sorted(p.name for p in tmp_path.glob("painting*")) == ["painting-1.png", "painting-2.png"]
    for number in (1, 2):
        fields = read_parameters(Path(f"painting-{number}.png"))
        assert "negative" not in fields  # no "Negative prompt:" line for an empty one, as in A1111
        assert fields["Denoising strength"] == "0.5"
        assert fields["Sampler"] == "DPM++ 2M Karras"
        assert fields["Seed"] == str(seed + number - 1)


def test_an_interrupted_batch_keeps_its_images_and_resumes(safetensors_checkpoint, tmp_path, ctrl_c_at_png, monkeypatch):
    Path("prompts.txt").write_text("# three prompts\na red apple\n\nA green pear!\n  a yellow banana  \n")
    args = ["--prompts-file", "prompts.txt", "--seed", 7, "--cfg", 1, "--outdir", "fruit", "--checkpoint", safetensors_checkpoint, *SMALL]
    ctrl_c_at_png(2)  # Ctrl+C while the second image is being saved: the first must stay, no temporary file may
    result = sd(*args)
    ctrl_c_at_png(None)
    assert result.exit_code == 130
    assert "interrupted: 1 of 3 images saved; run the same command with --seed 7" in result.stderr
    assert "Traceback" not in result.output
    assert [p.name for p in Path("fruit").iterdir()] == ["00000-7-a-red-apple.png"]

    result = sd(*args)
    assert result.exit_code == 0, result.output
    assert "skipped, exists: fruit/00000-7-a-red-apple.png" in result.stdout
    names = ["00000-7-a-red-apple.png", "00001-8-a-green-pear.png", "00002-9-a-yellow-banana.png"]
    assert sorted(p.name for p in Path("fruit").iterdir()) == names
    for name, prompt, seed in zip(names, ["a red apple", "A green pear!", "a yellow banana"], ["7", "8", "9"]):
        fields = read_parameters(Path("fruit") / name)
        assert (fields["prompt"], fields["Seed"]) == (prompt, seed)

    # Once every image exists, nothing is loaded at all.
    monkeypatch.setattr(cli, "cached_models", lambda *args: pytest.fail("the models were loaded"))
    result = sd(*args)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("skipped, exists") == 3


def test_the_installed_script_stops_on_ctrl_c_and_resumes(safetensors_checkpoint, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red apple\na green pear\na blue plum\n")
    args = [SD_SCRIPT, "generate", "--prompts-file", "prompts.txt", "--seed", 100, "--cfg", 1, "--checkpoint", safetensors_checkpoint, *SMALL]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(list(map(str, args)), cwd=tmp_path, stdout=subprocess.PIPE, stderr=stderr, text=True)
        first = process.stdout.readline()
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=120)
    errors = (tmp_path / "stderr.txt").read_text()
    assert first == "saved outputs/00000-100-a-red-apple.png\n", errors
    assert process.returncode == 130, errors
    assert "Traceback" not in errors
    saved = 1 + rest.count("saved ")
    assert f"interrupted: {saved} of 3 images saved" in errors
    assert len(list((tmp_path / "outputs").glob("*.png"))) == saved < 3

    finish = sd_process(*args[2:], cwd=tmp_path)
    assert finish.returncode == 0, finish.stderr
    assert finish.stdout.count("skipped, exists") == saved and finish.stdout.count("saved ") == 3 - saved
    assert len(list((tmp_path / "outputs").iterdir())) == 3

    # Same settings, same pixels: in this process as in the script.
    result = sd("--prompt", "a blue plum", "--seed", 102, "--cfg", 1, "--output", "plum.png", "--checkpoint", safetensors_checkpoint, *SMALL)
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(tmp_path / "plum.png"), pixels(tmp_path / "outputs" / "00002-102-a-blue-plum.png"))


@pytest.mark.parametrize(
    "args, fields",
    [
        ([], "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5"),  # AUTOMATIC1111's defaults
        (["--sampler", "ddpm", "--steps", 4], "Steps: 4, Sampler: DDPM, CFG scale: 7.5"),
        (["--sampler", "euler"], "Steps: 20, Sampler: Euler, CFG scale: 7.5"),
        (["--no-karras"], "Steps: 20, Sampler: DPM++ 2M, CFG scale: 7.5"),
        (["--sampler", "heun", "--karras", "--steps", 3], "Steps: 3, Sampler: Heun Karras, CFG scale: 7.5"),
    ],
)
def test_default_sampler_and_steps_are_automatic1111s(args, fields):
    result = sd("--prompt", "a red circle on the left", "--seed", 1, "--checkpoint", "demo", "--output", "out.png", *args)
    assert result.exit_code == 0, result.output
    assert f"\n{fields}, Seed: 1, Size: 64x64, " in Image.open("out.png").text["parameters"]


def test_seed_minus_one_is_a_random_seed_written_to_the_image():
    seeds = []
    for name in ("a.png", "b.png"):
        result = sd("--prompt", "a red circle on the left", "--seed", -1, "--steps", 2, "--checkpoint", "demo", "--output", name)
        assert result.exit_code == 0, result.output
        seeds.append(int(result.stderr.split("seed: ", 1)[1].split()[0]))
        assert read_parameters(Path(name))["Seed"] == str(seeds[-1])
    assert seeds[0] != seeds[1]  # two draws from 2**32 seeds


def test_a_batch_counts_its_seeds_past_two_to_the_32():
    """AUTOMATIC1111's seeds are any integer and a batch's are seed + i: 2**32 - 1 then 2**32, two other pictures."""
    result = sd("--prompt", "a red circle on the left", "--seed", 2**32 - 1, "--num-images", 2, "--steps", 2,
                "--checkpoint", "demo", "--output", "seed.png")
    assert result.exit_code == 0, result.output
    assert [read_parameters(Path(f"seed-{number}.png"))["Seed"] for number in (1, 2)] == ["4294967295", "4294967296"]
    assert not np.array_equal(pixels(Path("seed-1.png")), pixels(Path("seed-2.png")))


def test_model_hash_is_cached_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("SD_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "model.bin"
    content = os.urandom(hashes.CHUNK_BYTES + 12345)  # more than one read
    path.write_bytes(content)
    assert hashes.sha256(path) == hashlib.sha256(content).hexdigest()
    assert hashes.short_hash(path) == hashlib.sha256(content).hexdigest()[:10]
    assert str(path.resolve()) in (tmp_path / "cache" / "model_hashes.json").read_text()

    hashed = []
    monkeypatch.setattr(hashes, "_hash_file", lambda p, start: hashed.append(p) or "f" * 64)
    assert hashes.sha256(path) == hashlib.sha256(content).hexdigest()
    assert hashed == []  # read from the cache

    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert hashes.sha256(path) == "f" * 64 and len(hashed) == 1  # a touched file is hashed again

    (tmp_path / "cache" / "model_hashes.json").write_text("{damaged")
    assert hashes.sha256(path) == "f" * 64 and len(hashed) == 2  # a damaged cache is rebuilt
    assert hashes.cached_sha256(path) == "f" * 64


def test_model_hash_cache_location(tmp_path, monkeypatch):
    assert hashes.cache_file() == Path(os.environ["SD_CACHE_DIR"]) / "model_hashes.json"
    monkeypatch.delenv("SD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hashes.cache_file() == tmp_path / "sd" / "model_hashes.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert hashes.cache_file() == Path.home() / ".cache" / "sd" / "model_hashes.json"


def test_help_lists_the_samplers_and_the_naming():
    result = CliRunner().invoke(cli.main, ["generate", "--help"])
    assert result.exit_code == 0
    assert f"--sampler [{'|'.join(cli.SAMPLERS)}]" in result.output
    assert "00000-42-a-photo-of-a-cat.png" in result.output.replace("\n", "").replace(" ", "")


def test_the_console_script_is_installed():
    assert SD_SCRIPT, "no `sd` next to the Python running the tests: pip install -e . installs it"
