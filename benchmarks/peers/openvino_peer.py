"""OpenVINO's guided U-Net step and VAE decode, run by its own environment's python (`make peer-envs`).

    .venv-openvino/bin/python benchmarks/peers/openvino_peer.py '{"checkpoint": "...", "size": 512, "repeat": 3, "precision": "bf16"}'

diffusers' UNet2DConditionModel and AutoencoderKL are built from the checkpoint's tensors by diffusers' own
single-file converters (tests/reference.py, as the benchmark builds them), converted by openvino.convert_model
from example inputs of the benchmark's shapes (guided batch 2, size/8 latents, 77x768 context), and compiled for
the CPU with the inference precision asked for. Prints one JSON line: the seconds of converting and compiling
each model, and the median and min of the wall and CPU seconds of `repeat` calls of each after a warm-up call.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import openvino
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from reference import reference_unet, reference_vae  # noqa: E402


class GuidedStep(torch.nn.Module):
    """The U-Net as a function of plain tensors, the form convert_model traces."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, latents, timestep, context):
        return self.unet(latents, timestep, encoder_hidden_states=context, return_dict=False)[0]


class Decode(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


def timed(function) -> tuple[float, float]:
    """Wall and CPU seconds (this process's user + system time, all threads: on a shared machine it moves less than
    wall time) of one call of `function`."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def summary(seconds: list[float]) -> dict:
    seconds = sorted(seconds)
    return {"min": seconds[0], "median": seconds[len(seconds) // 2], "runs": len(seconds)}


def measure(name: str, build, inputs: tuple, precision: str, repeat: int, core: openvino.Core) -> dict:
    """Converts and compiles one model, then times its calls. The conversion's seconds include building diffusers' model
    from the checkpoint (a few seconds), the start of what a user converting it pays; the torch model is dropped once
    converted."""
    start = time.perf_counter()
    with torch.no_grad():
        model = openvino.convert_model(build(), example_input=inputs)
    converted = time.perf_counter() - start
    start = time.perf_counter()
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"})
    compiled_s = time.perf_counter() - start
    del model
    request = compiled.create_infer_request()
    feed = [tensor.numpy() for tensor in inputs]
    request.infer(feed)  # warm-up
    runs = [timed(lambda: request.infer(feed)) for _ in range(repeat)]
    result = {f"{name}_s": summary([wall for wall, _ in runs]), f"{name}_cpu_s": summary([cpu for _, cpu in runs]),
              f"{name}_convert_s": converted, f"{name}_compile_s": compiled_s,
              f"{name}_precision": compiled.get_property("INFERENCE_PRECISION_HINT").to_string()}
    assert np.isfinite(request.get_output_tensor(0).data).all(), f"{name}: OpenVINO gave non-finite outputs"
    return result


def main() -> None:
    spec = json.loads(sys.argv[1])
    checkpoint, size, repeat = spec["checkpoint"], spec["size"], spec["repeat"]
    precision = {"bf16": "bf16", "fp32": "f32"}[spec["precision"]]
    core = openvino.Core()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, size // 8, size // 8, generator=generator)
    context = torch.randn(2, 77, 768, generator=generator)
    timestep = torch.tensor([500, 500])
    result = {"openvino": openvino.__version__, "cpu_capabilities": core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")}
    result |= measure("unet_step", lambda: GuidedStep(reference_unet(checkpoint, plain_attention=False)), (latents, timestep, context),
                      precision, repeat, core)
    result |= measure("vae_decode", lambda: Decode(reference_vae(checkpoint, plain_attention=False)), (latents[:1],), precision, repeat, core)
    status = Path("/proc/self/status").read_text()
    result["peak_rss_gib"] = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 2**20
    print(json.dumps(result))


if __name__ == "__main__":
    main()
