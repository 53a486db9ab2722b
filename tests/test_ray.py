"""`sd generate --ray` and `sd.render_batch()`: a batch rendered by a pool of Ray actors on a simulated cluster of
two nodes (one CPU each, so two workers land on both), started once for the module, with the demo model.

The sequential references are rendered with one torch thread, as each worker's single CPU gives it: on a CPU the
number of threads may change an image's last bit.
"""

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import cli
from sd import BatchFailed, Job, Settings, cluster, render_batch

ray = pytest.importorskip("ray", reason='the Ray tests need the optional extra: pip install -e ".[test]"')
from ray.cluster_utils import Cluster  # noqa: E402

PROMPTS = "a red circle on the left\na blue square on the top\na green triangle on the right\na yellow circle on the bottom\n"
BATCH = ["--prompts-file", "prompts.txt", "--num-images", 2, "--seed", 10, "--steps", 6, "--checkpoint", "demo"]
NAMES = [f"{index:05d}-{10 + index}-{prompt.replace(' ', '-')}.png" for index, prompt in enumerate(
    prompt for prompt in PROMPTS.splitlines() for _ in range(2))]
SMALL_STORE = 100 * 1024**2
CRASH_ONCE, CRASH_ALWAYS = "lost-worker/00002-", "doomed/00001-"  # the jobs whose worker's process exits


@pytest.fixture(scope="module")
def ray_cluster():
    """Two Ray nodes of one CPU each in this machine, with the crash hooks set for their workers. Ray puts the
    working directory of ray.init() (here the repository's) on its workers' path: they import this checkout's sd."""
    hooks = {cluster.CRASH_ONCE: CRASH_ONCE, cluster.CRASH_ALWAYS: CRASH_ALWAYS}
    os.environ.update(hooks)  # before the nodes start: their workers inherit the environment
    nodes = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, object_store_memory=SMALL_STORE, include_dashboard=False))
    try:
        nodes.add_node(num_cpus=1, object_store_memory=SMALL_STORE)
        ray.init(address=nodes.address, log_to_driver=False)  # as the command does: workers' logs stay off its output
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()
        for name in hooks:
            del os.environ[name]


@pytest.fixture(autouse=True)
def environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    Path("prompts.txt").write_text(PROMPTS)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> Path:
    """The batch rendered in this process, without Ray: the folder of its 8 images."""
    folder = tmp_path_factory.mktemp("sequential")
    (folder / "prompts.txt").write_text(PROMPTS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cwd = os.getcwd()
    try:
        os.chdir(folder)
        result = sd(*BATCH, "--outdir", "images")
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return folder / "images"


def sd(*args):
    return CliRunner().invoke(cli.main, ["generate", *map(str, args)], prog_name="sd")


def assert_same_images(folder: Path, reference: Path):
    """Every file of the batch, and nothing else (no temporary file), each with the reference's pixels and settings."""
    assert sorted(path.name for path in folder.iterdir()) == NAMES
    for name in NAMES:
        with Image.open(folder / name) as image, Image.open(reference / name) as expected:
            assert np.array_equal(np.asarray(image), np.asarray(expected)), name
            assert image.text == expected.text, name


def test_two_workers_on_two_nodes_make_the_sequential_images(ray_cluster, sequential):
    result = sd(*BATCH, "--outdir", "images", "--ray", "--workers", 2)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("saved ") == 8
    assert "8/8" in result.stderr and "2 nodes" in result.stderr  # one bar for the batch
    assert_same_images(Path("images"), sequential)


def test_a_worker_lost_mid_batch_costs_only_its_job_which_runs_again(ray_cluster, sequential, caplog):
    result = sd(*BATCH, "--outdir", "lost-worker", "--ray", "--workers", 2)
    assert result.exit_code == 0, result.output
    # the command's stderr, but for pytest's capture of the log
    assert f"a worker was lost; Ray restarted it and ran its job again: lost-worker/{NAMES[2]}" in caplog.text
    assert result.stdout.count("saved ") == 8
    assert_same_images(Path("lost-worker"), sequential)


def test_a_job_whose_worker_dies_every_time_is_named_and_the_rest_complete(ray_cluster):
    result = sd("--prompt", "a red circle on the left", "--num-images", 3, "--seed", 10, "--steps", 6, "--checkpoint", "demo",
                "--outdir", "doomed", "--ray")
    assert result.exit_code == 1, result.output
    assert "1 of 3 images failed: doomed/00001-11-a-red-circle-on-the-left.png: its worker died each of the 3 times" in result.stderr
    assert "Traceback" not in result.output
    assert sorted(path.name for path in Path("doomed").iterdir()) == ["00000-10-a-red-circle-on-the-left.png", "00002-12-a-red-circle-on-the-left.png"]


def test_an_interrupted_batch_keeps_its_images_and_the_rerun_makes_only_the_rest(ray_cluster, sequential, ctrl_c_at_png):
    ctrl_c_at_png(3)  # Ctrl+C while the third image is being written
    result = sd(*BATCH, "--outdir", "images", "--ray")
    ctrl_c_at_png(None)
    assert result.exit_code == 130, result.output
    assert "interrupted: 2 of 8 images saved; run the same command with --seed 10" in result.stderr
    assert len(list(Path("images").iterdir())) == 2  # and no temporary file
    wait_for_free_cpus(2)  # the interrupted workers are gone

    result = sd(*BATCH, "--outdir", "images", "--ray")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("skipped, exists") == 2 and result.stdout.count("saved ") == 6
    assert_same_images(Path("images"), sequential)


def test_the_library_names_a_job_that_fails_for_its_own_reason(ray_cluster, sequential):
    good = Settings("a red circle on the left", seed=10, steps=6, sampler="dpmpp_2m", karras=True)
    jobs = [Job(good, Path("out") / NAMES[0]), Job(Settings("a bad size", hires_scale=0.5), Path("out/bad.png"))]
    finished = []
    with pytest.raises(BatchFailed) as failed:
        for path in render_batch(jobs, "demo", workers=1, progress=False):
            finished.append(path)
    assert failed.value.exit_code == 1
    assert str(failed.value).startswith("1 of 2 images failed: out/bad.png: ")
    assert finished == [Path("out") / NAMES[0]] and sorted(os.listdir("out")) == [NAMES[0]]
    with Image.open(finished[0]) as image, Image.open(sequential / NAMES[0]) as expected:
        assert np.array_equal(np.asarray(image), np.asarray(expected))


def wait_for_free_cpus(count: int, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < count:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)


def assert_one_line_error(result, expected: str):
    """One line, exit 2; beside it may be the progress bar, and Ray's own notices (printed late) of workers killed."""
    assert result.exit_code == 2, result.output
    [error] = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert error.startswith(expected) and "Traceback" not in result.output, result.output


def test_without_ray_installed_it_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails
    assert_one_line_error(sd(*BATCH, "--ray"), 'error: --ray needs Ray, an optional extra: pip install "sd[ray]"')


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:1", "error: cannot reach a Ray cluster at 127.0.0.1:1"),
    ("my-cluster", "error: Ray address 'my-cluster': give the head node's HOST:PORT"),
])
def test_an_unreachable_address_is_refused_at_once(monkeypatch, address, expected):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a command of its own, not connected yet
    started = time.monotonic()
    assert_one_line_error(sd(*BATCH, "--ray", address), expected)
    assert time.monotonic() - started < 10


def test_a_checkpoint_the_workers_cannot_load_stops_the_batch_in_one_line(ray_cluster):
    Path("broken.safetensors").write_bytes(b"not a checkpoint")
    result = sd(*BATCH[:-1], "broken.safetensors", "--ray", "--workers", 1)
    assert_one_line_error(result, "error: a worker failed: cannot read ")
    assert "broken.safetensors" in result.output


@pytest.mark.parametrize("args, expected", [
    (["--ray", "--workers", 0], "error: Invalid value for '--workers': 0 is not in the range x>=1"),
    (["--workers", 2], "error: --workers is an option of --ray: add --ray"),
    (["--ray", "--workers", 3], "error: the Ray cluster has 2 CPUs and 0 GPUs: room for 2 workers of 1 CPU and 0 GPUs each, not 3"),
    (["--ray", "--gpus-per-worker", 1], "error: the Ray cluster has 2 CPUs and 0 GPUs: room for 0 workers of 1 CPU and 1 GPU each; give "),
    (["--ray", "--cpus-per-worker", "nan"], "error: each worker's CPUs must be a number of 0 or more, got nan"),
])
def test_bad_ray_options_are_refused(ray_cluster, args, expected):
    assert_one_line_error(sd(*BATCH, *args), expected)
