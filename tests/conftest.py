import gc
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # any attempt to reach a model hub fails instead of downloading

from checkpoints import random_sd15_state_dict, write_checkpoint  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def cache_folder(tmp_path_factory):
    """sd's cache in a folder of the session's, never the user's. The kernel choices (sd/kernels.py) have a file of
    their own there, which tests that give SD_CACHE_DIR a folder of theirs keep: the commands the tests start
    inherit it, so that each choice is timed once in the session and every process runs the same paths."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SD_CACHE_DIR", str(folder))
        patch.setenv("SD_KERNELS_CACHE", str(folder / "kernels.json"))
        yield


@pytest.fixture(scope="session")
def checkpoint_files(tmp_path_factory):
    """One random full-size SD 1.5 checkpoint (4.3 GB in fp32), as .safetensors and as .ckpt."""
    folder = tmp_path_factory.mktemp("checkpoint")
    state = random_sd15_state_dict(seed=0)
    files = {suffix: write_checkpoint(state, folder / f"random-sd15{suffix}") for suffix in (".safetensors", ".ckpt")}
    del state
    gc.collect()
    return files


@pytest.fixture(scope="session")
def safetensors_checkpoint(checkpoint_files):
    return checkpoint_files[".safetensors"]


@pytest.fixture(scope="session")
def ckpt_checkpoint(checkpoint_files):
    return checkpoint_files[".ckpt"]


@pytest.fixture(scope="module")
def demo():
    """The built-in demo model, loaded once per test file (small: no lock needed)."""
    from sd import load_models
    from sd.pipeline import DEMO_CHECKPOINT

    return load_models(DEMO_CHECKPOINT)


@pytest.fixture(scope="module")
def models(safetensors_checkpoint):
    """Our models from the random checkpoint, loaded once per test file and freed after it (4.3 GB)."""
    from sd import load_models

    loaded = load_models(safetensors_checkpoint)
    yield loaded
    del loaded
    gc.collect()


@pytest.fixture
def command_environment(monkeypatch, tmp_path):
    """The command run in a temporary folder, offline, with its own hash cache."""
    monkeypatch.setenv("SD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def ctrl_c_at_png(monkeypatch):
    """stop(n): Ctrl+C (KeyboardInterrupt) while the n-th PNG is moved into place (os.replace, as sd writes every
    image), from then on; stop(None): images are written as usual again."""
    real_replace = os.replace

    def stop(number: int | None) -> None:
        renamed = []

        def replace_then_stop(source, target):
            if str(target).endswith(".png"):
                renamed.append(target)
                if len(renamed) == number:
                    raise KeyboardInterrupt
            real_replace(source, target)

        monkeypatch.setattr(os, "replace", real_replace if number is None else replace_then_stop)

    return stop


@pytest.fixture(scope="module")
def vae(safetensors_checkpoint):
    """diffusers' AutoencoderKL on the random checkpoint's weights, the reference for our VAE."""
    from reference import reference_vae

    model = reference_vae(safetensors_checkpoint)
    yield model
    del model
    gc.collect()


@pytest.fixture(scope="session")
def controlnet_file(tmp_path_factory):
    """One random full-size SD 1.5 ControlNet in the original layout (control_model.*), fp16 on disk (0.7 GB)."""
    import torch
    from controlnets import control_params, random_controlnet_state_dict, write_controlnet

    path = tmp_path_factory.mktemp("controlnet") / "control_random_sd15.safetensors"
    write_controlnet(random_controlnet_state_dict(control_params(), seed=1, dtype=torch.float16), path)
    gc.collect()
    return path
