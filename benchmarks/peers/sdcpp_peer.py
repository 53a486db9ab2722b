"""stable-diffusion.cpp's txt2img on the original .safetensors, run by its own environment's python (`make peer-envs`).

    .venv-sdcpp/bin/python benchmarks/peers/sdcpp_peer.py '{"checkpoint": "...", "size": 512, "steps": 2, "wtype": "q8_0"}'

Loads the checkpoint with the weights converted to `wtype` (f16, q8_0, ...), then renders one image with Euler,
CFG 7, seed 0, on all the CPU's threads (the binding's default is half of them). Prints one JSON line: the load's
seconds, the wall and CPU seconds of each sampling step (between calls of its progress callback, which it makes as sampling starts
and after each step), and the text encoding, sampling and VAE decode
seconds from its own timing log, so that a short run tells the cost of a longer one.
"""

import ctypes
import json
import os
import re
import sys
import time
from pathlib import Path

import stable_diffusion_cpp as sd_cpp

# stable-diffusion.cpp's log lines that time the stages of generate_image
STAGES = {
    "text_encoding_s": r"get_learned_condition completed, taking ([\d.]+)(m?s)",
    "sampling_s": r"sampling completed, taking ([\d.]+)(m?s)",
    "vae_decode_s": r"decode_first_stage completed, taking ([\d.]+)(m?s)",
}


def summary(seconds: list[float]) -> dict:
    seconds = sorted(seconds)
    return {"min": seconds[0], "median": seconds[len(seconds) // 2], "runs": len(seconds)}


def logged_seconds(log: str, pattern: str) -> float:
    found = re.findall(pattern, log)
    if not found:
        raise SystemExit(f"stable-diffusion.cpp's log has no line matching {pattern!r}")
    value, unit = found[-1]
    return float(value) / (1000 if unit == "ms" else 1)


def ggml_version() -> str:
    """ggml's version, which the binding's build installs beside the package (its sd_version() says 'unknown')."""
    config = Path(sd_cpp.__file__).parent.parent / "lib" / "cmake" / "ggml" / "ggml-version.cmake"
    found = re.search(r'set\(PACKAGE_VERSION "([^"]+)"\)', config.read_text()) if config.exists() else None
    return found[1] if found else "unknown"


def main() -> None:
    spec = json.loads(sys.argv[1])
    lines = []

    @sd_cpp.sd_log_callback
    def keep(level, text, data):
        lines.append(text.decode("utf-8", errors="replace"))

    sd_cpp.sd_set_log_callback(keep, ctypes.c_void_p(0))
    threads = os.cpu_count()
    start = time.perf_counter()
    # verbose=False sends the C library's progress bars away from our stdout; `keep` still gets every log line
    model = sd_cpp.StableDiffusion(model_path=spec["checkpoint"], wtype=spec["wtype"], n_threads=threads, vae_decode_only=True, verbose=False)
    load = time.perf_counter() - start
    ticks = []
    start = time.perf_counter()
    model.generate_image(prompt="a photograph of an astronaut riding a horse", width=spec["size"], height=spec["size"], cfg_scale=7.0,
                         sample_method="euler", sample_steps=spec["steps"], seed=0,
                         progress_callback=lambda *_: ticks.append((time.perf_counter(), time.process_time())))
    generate = time.perf_counter() - start
    log = "".join(lines)
    status = Path("/proc/self/status").read_text()
    print(json.dumps({
        "stable_diffusion_cpp_python": sd_cpp.__version__, "ggml": ggml_version(), "threads": threads, "wtype": spec["wtype"],
        "load_s": load, "step_s": summary([b[0] - a[0] for a, b in zip(ticks, ticks[1:])]),
        "step_cpu_s": summary([b[1] - a[1] for a, b in zip(ticks, ticks[1:])]), "generate_s": generate, **{name: logged_seconds(log, pattern) for name, pattern in STAGES.items()},
        "peak_rss_gib": next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 2**20,
    }))


if __name__ == "__main__":
    main()
