"""Which kernel each CPU-dependent operation runs, chosen on the CPU at hand rather than from another CPU's findings.

Each choice has its candidate paths, the reference (PyTorch's plain path) first:
- attention: `sdpa` (F.scaled_dot_product_attention) or `pieces` (plain matrix products over cache-sized pieces
  of the scores, sd/models/attention.py);
- packing: `off`, `on` or `sizes`: the U-Net's, decoder's and ControlNet's weights stored in oneDNN's own layouts
  (sd/models/layers.py, pack_weights), at load with convolution kernels laid out for 8x8 inputs (`on`), or each
  kernel at its first call for the shape of the input it meets, and anew where that changes (`sizes`: oneDNN reorders a
  kernel laid out for another class of sizes on every call, with AVX2 up to 10x slower than a plain one);
- linear: `matmul` (F.linear: MKL or oneDNN, by dtype) or `convolution` (the same product as a 1x1 convolution:
  oneDNN's, sd/models/layers.py, linear_as_convolution);
- channels_last: `off` or `on`, convolution kernels, and so the activations they make, laid out channels_last;
- convolution: `direct` (oneDNN's) or `winograd` (Winograd's F(4x4, 3x3), sd/models/winograd.py), fp32 3x3
  convolutions of large inputs; where it is chosen, the kernels it takes are not packed at load.

On CUDA and MPS the paths are fixed (PATHS_OFF_CPU). On a CPU, capability rules out what cannot pay: bf16 without
bf16 instructions, and fp16, compute in fp32 in our models (sd/precision.py), so such weights get the reference
paths; packing needs oneDNN on x86. Where more than one path is left, a short timing of each on SD 1.5's layer
shapes decides (on a 2-core Zen 4: 2.1-2.7 s for fp32, 1.3-1.5 s for bf16), once per CPU model and flags, torch
version, thread count, dtype and version of the paths (TIMED). The result is kept in memory for the
process and in `kernels.json` in sd's cache folder ($SD_CACHE_DIR, else $XDG_CACHE_HOME/sd or ~/.cache/sd;
$SD_KERNELS_CACHE names another file), with a warning where other work kept the CPU busy meanwhile (QUIET_SHARE). An
alternative must beat the reference by MARGIN in all (packing costs load time, and timings wander by a few percent),
and be at most SLOWER_AT_MOST times as slow at each image size timed (packing is timed at OTHER_SIZES too): a faster
512x512 step must not buy a path that makes renders of another size several times slower. A later path must also
beat the one chosen before it by MARGIN: packing's `sizes` packs again where the image size changes, for nothing
where `on`'s one layout suits every size (with AVX-512 it does; with AVX2 `on` is 10x slower at some sizes).

SD_KERNELS="attention=sdpa,packing=off" forces paths on a CPU, whatever was measured (the tests force each one).

torch.compile is not among the paths: on a Zen 5 inductor's step (from the paths it can trace) took 1.42-1.57x the
chosen eager one after a compile of a minute or more on every run, in twice the memory (benchmarks/README.md);
`benchmark.py --only compile` measures it on another CPU.
"""

import contextlib
import functools
import json
import logging
import os
import platform
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import SDError
from .files.hashes import cache_folder, write_json_atomically
from .precision import cpu_has_bf16

log = logging.getLogger("sd")

CHOICES = {
    "attention": ("sdpa", "pieces"),
    "packing": ("off", "on", "sizes"),
    "linear": ("matmul", "convolution"),
    "channels_last": ("off", "on"),
    "convolution": ("direct", "winograd"),
}
# channels_last is 10-20 % faster on CUDA; MPS gains nothing from it
PATHS_OFF_CPU = {"cuda": {"attention": "sdpa", "packing": "off", "linear": "matmul", "channels_last": "on", "convolution": "direct"}}
PATHS_OFF_CPU["mps"] = {**PATHS_OFF_CPU["cuda"], "channels_last": "off"}
MARGIN = 0.05
# oneDNN lays a packed kernel out for one input shape; where it runs another shape in another layout it reorders the
# kernel on each call. With AVX2 alone (a Zen 4 capped at AVX2) that made some shapes 3-40x slower packed: a guided
# 128x128 U-Net step 4.8x, an unguided 384x384 one 3.1x, while a 512x512 guided one ran 0.97x. Timings of one size
# wander by about 10 %.
SLOWER_AT_MOST = 1.25
# Under other work the paths slow down unequally (many small products wait on descheduled threads: the pieces'
# attention ran 5x slower than the fused kernel on a 2-core Zen 4 sharing its cores, 1.3x faster alone), so a
# timing during which this process had less than this share of its threads' CPU time is named in a warning: there
# it had 0.49 shared, 0.96-1.00 alone. It is cached all the same: the same machine must make the same images.
QUIET_SHARE = 0.75
CACHE_NAME = "kernels.json"
# What was timed: change it with the shapes or the paths' code, so that entries timed on the old ones no longer count.
TIMED = "SD 1.5 layers at 512x512; attention pieces by powers of 2, fp32 by oneDNN, one piece's scores at a time; kernels packed for one 8x8 input or per input shape; packing checked at 2x2 and 32x32; Winograd F(4x4, 3x3)"
X86_ONEDNN = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()

_chosen: dict[tuple, str] = {}
_lock = threading.RLock()  # re-entrant: a choice timed after others (TIMED_AFTER) makes those first


def choice(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The path of `name` (a key of CHOICES) for computing in `dtype` on `device`. Called on every layer's call:
    after the first, a dictionary look-up."""
    if device.type != "cpu":
        return PATHS_OFF_CPU.get(device.type, PATHS_OFF_CPU["cuda"])[name]
    forced = forced_by_environment()
    if name in forced:
        return forced[name]
    key = (name, dtype, torch.get_num_threads())
    if key not in _chosen:
        with _lock:
            if key not in _chosen:
                _chosen[key] = _choose(name, dtype)
    return _chosen[key]


def forced_by_environment() -> dict[str, str]:
    """The paths SD_KERNELS forces; SDError where it names an unknown choice or path."""
    return forced_paths(os.environ.get("SD_KERNELS", ""))


@functools.lru_cache(maxsize=8)
def forced_paths(text: str) -> dict[str, str]:
    """SD_KERNELS read: "name=path,..." -> {name: path}; SDError naming what is wrong."""
    forced = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, path = (word.strip() for word in item.partition("="))
        if path not in CHOICES.get(name, ()):
            options = "; ".join(f"{key}={'|'.join(paths)}" for key, paths in CHOICES.items())
            raise SDError(f"SD_KERNELS: unknown {'path' if name in CHOICES else 'choice'} {item!r}: use {options}")
        forced[name] = path
    return forced


def candidates(name: str, dtype: torch.dtype) -> tuple[str, ...]:
    """The paths that can pay on this CPU for `dtype`."""
    paths = CHOICES[name]
    if dtype != torch.float32 and not (dtype == torch.bfloat16 and cpu_has_bf16()):
        return paths[:1]  # never the dtype our models compute in here (sd/precision.py): nothing to gain
    if name == "packing" and not X86_ONEDNN:
        return paths[:1]
    if name == "convolution" and dtype != torch.float32:  # Winograd's sums lose 2-3 bits that bf16 has not to spare
        return paths[:1]
    return paths


def choose_all(dtype: torch.dtype) -> dict[str, str]:
    """Every choice for `dtype` on this CPU, measured now where not yet (so that a benchmark times none of it)."""
    return {name: choice(name, torch.device("cpu"), dtype) for name in CHOICES}


def _choose(name: str, dtype: torch.dtype) -> str:
    paths = candidates(name, dtype)
    if len(paths) == 1:
        return paths[0]
    for first in TIMED_AFTER.get(name, ()):
        choice(first, torch.device("cpu"), dtype)
    key = cache_key(dtype)
    with _cache_lock():
        entry = _read_cache().get(key, {}).get(name, {})
        if entry.get("path") in paths:
            return entry["path"]
        seconds, share = timed(TIMED_CALLS[name](dtype))
        path = fastest_that_pays(seconds, paths)
        log.info("kernels: %s=%s for %s on this CPU (seconds: %s; CPU share %.2f)", name, path, dtype, seconds, share)
        if share < QUIET_SHARE:
            log.warning("other work kept the CPU busy while sd timed its %s kernels (%d %% of %d threads' time), so %s=%s "
                        "may not be the fastest: delete %s to time them again", name, 100 * share, torch.get_num_threads(),
                        name, path, cache_file())
        _store(key, name, {"path": path, "seconds": seconds, "cpu_share": round(share, 2)})
    return path


def fastest_that_pays(seconds: dict[str, list[float]], paths: tuple[str, ...]) -> str:
    """Of `paths` (seconds per path and image size timed), the reference (the first path) unless another beats it by
    MARGIN in all and is at most SLOWER_AT_MOST times as slow at each size; of those that do, a later one only where
    it beats the one chosen before it by MARGIN too (each path costs more than the one before: packing's `sizes`
    packs again where the image size changes, for nothing where `on`'s one layout suits every size)."""
    reference, chosen = seconds[paths[0]], paths[0]
    for path in paths[1:]:
        cases = seconds[path]
        safe = all(own <= SLOWER_AT_MOST * theirs for own, theirs in zip(cases, reference))
        if safe and sum(cases) < (1 - MARGIN) * sum(seconds[chosen]):
            chosen = path
    return chosen


@contextlib.contextmanager
def _cache_lock():
    """Held while a choice is read, timed and stored: processes that share the cache (a batch's workers, a benchmark's
    figures) then time each choice once, and all run the path it chose."""
    path = cache_file()
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_name(f"{path.name}.lock"), "w")
    except (ImportError, OSError):  # no fcntl (Windows) or no folder to hold the lock: time without it
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def timings(dtype: torch.dtype) -> dict:
    """This CPU's cached choices for `dtype`, each with the seconds its paths took (for a benchmark's record)."""
    return _read_cache(warn=False).get(cache_key(dtype), {})


def cache_key(dtype: torch.dtype) -> str:
    threads = torch.get_num_threads()
    return f"{cpu_model()}; {' '.join(cpu_flags())}; torch {torch.__version__}; {threads} threads; {dtype}; {TIMED}"


@functools.cache
def cpu_model() -> str:
    """The CPU's model name with its family and model numbers (a virtual machine may call every EPYC "AMD EPYC")."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    return f"{fields.get('model name', platform.machine())} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')})"


@functools.cache
def cpu_flags() -> list[str]:
    """PyTorch's vector capability and the matrix instructions its kernels use."""
    extras = [flag for flag in ("avx512_bf16", "amx_tile", "amx_fp16") if getattr(torch.cpu, f"_is_{flag}_supported", lambda: False)()]
    return [torch.backends.cpu.get_cpu_capability().lower(), *extras]


def cache_file() -> Path:
    """$SD_KERNELS_CACHE, else kernels.json in sd's cache folder."""
    return Path(os.environ.get("SD_KERNELS_CACHE") or cache_folder() / CACHE_NAME)


def _read_cache(warn: bool = True) -> dict:
    path = cache_file()
    try:
        entries = json.loads(path.read_text())
        if not isinstance(entries, dict):
            raise ValueError("not a JSON object")
        return entries
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        if warn:
            log.warning("ignoring the kernel choices cached in %s (%s): measuring again", path, error)
        return {}


def _store(key: str, name: str, entry: dict) -> None:
    """Adds one choice, re-reading the cache first to keep what another process wrote meanwhile."""
    path = cache_file()
    entries = _read_cache(warn=False)  # a damaged file was named when read for the choice, and is replaced
    entries[key] = {**entries.get(key, {}), name: entry}
    try:
        write_json_atomically(path, entries)
    except OSError as error:
        log.warning("could not cache the kernel choice in %s (%s): it will be measured again next time", path, error.strerror)


def timed(calls: dict[str, list], turns: int = 3, hopeless: float = 1.5) -> tuple[dict[str, list[float]], float]:
    """The best of `turns` seconds of each path's calls (one per image size), the paths taking turns (so that a busy
    spell hits all of them), after one warm-up each (oneDNN builds its kernels on the first call), and the share of
    its threads' CPU time this process had meanwhile. A path slower in all than `hopeless` times the fastest in two
    turns is not timed a third time (one turn could be a busy spell)."""
    best = {path: [float("inf")] * len(cases) for path, cases in calls.items()}
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for cases in calls.values():
            for call in cases:
                call()
        running = dict(calls)
        for turn in range(turns):
            for path, cases in running.items():
                for index, call in enumerate(cases):
                    start = time.perf_counter()
                    call()
                    best[path][index] = min(best[path][index], time.perf_counter() - start)
            if turn == 1:
                fastest = min(map(sum, best.values()))
                running = {path: cases for path, cases in running.items() if sum(best[path]) < hopeless * fastest}
    share = (time.process_time() - cpu) / (time.perf_counter() - wall) / torch.get_num_threads()
    return {path: [round(seconds, 5) for seconds in cases] for path, cases in best.items()}, share


# a generator of its own: the global one must draw the same noise whether or not this process measured
_generator = torch.Generator().manual_seed(0)


def _random(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=_generator).to(dtype)


def all_of(function, cases):
    """One timed call: `function` over every case, the parts of one image's step."""
    return lambda: [function(*case) for case in cases]


def attention_calls(dtype: torch.dtype) -> dict:
    from .models.attention import attend_in_pieces

    # 2 of the 16 heads (batch 2 x 8) of the 64x64 latents' self-attention (4,096 tokens, 40 wide) and of the
    # 32x32 latents' one (80 wide), and 8 of the 64x64 cross-attention over the 77 text tokens: (B, heads, L, d).
    # Whole heads: on a Zen 4 a quarter of one head's queries picked the fused kernel in a fresh process (12.4
    # against 9.9 ms), where these pick the pieces in every run (35-39 against 51 ms), as the whole step does.
    cases = [[_random(dtype, 1, heads, length, width) for length in (queries, keys, keys)]
             for heads, queries, keys, width in ((2, 4096, 4096, 40), (2, 1024, 1024, 80), (8, 4096, 77, 40))]
    return {"sdpa": [all_of(F.scaled_dot_product_attention, cases)], "pieces": [all_of(attend_in_pieces, cases)]}


def linear_calls(dtype: torch.dtype) -> dict:
    from .models.layers import linear_as_convolution

    # (B, L, C_in) tokens and (C_out, C_in) weights: the attention's projection at 64x64, the feed-forward's
    # first product at 32x32
    shapes = ((4096, 320, 320), (1024, 640, 2560))
    cases = [(_random(dtype, 1, tokens, width), _random(dtype, out, width)) for tokens, width, out in shapes]
    return {"matmul": [all_of(F.linear, cases)],
            "convolution": [all_of(lambda x, weight: linear_as_convolution(x, weight, None), cases)]}


# (B, C, H, W) inputs of 3x3 convolutions: a quarter of the U-Net's top level at 512x512 (320 channels, 16 of the
# 64x64 latents' rows) and its lowest level (1280 channels, 8x8, batch 2: the guided batch)
SD_CONVOLUTIONS = ((1, 320, 16, 64), (2, 1280, 8, 8))
# Other image sizes, where a kernel packed for one shape may run in another layout: the lowest level of a guided
# 128x128 image, the top level of an unguided 256x256 one
OTHER_SIZES = ((2, 1280, 2, 2), (1, 320, 32, 32))


def convolution_cases(dtype: torch.dtype, layout: torch.memory_format, shapes=SD_CONVOLUTIONS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inputs of `shapes` and 3x3 kernels, in `layout`."""
    return [(_random(dtype, batch, channels, height, width).contiguous(memory_format=layout),
             _random(dtype, channels, channels, 3, 3).mul_(0.02).contiguous(memory_format=layout))
            for batch, channels, height, width in shapes]


def channels_last_calls(dtype: torch.dtype) -> dict:
    def residual_block_part(x, kernel):
        # the normalisation, SiLU and 3x3 convolution of a residual block: the layout moves all three
        return F.conv2d(F.silu(F.group_norm(x, 32)), kernel, padding=1)

    plain, laid_out = convolution_cases(dtype, torch.contiguous_format), convolution_cases(dtype, torch.channels_last)
    return {"off": [all_of(residual_block_part, plain)], "on": [all_of(residual_block_part, laid_out)]}


def chosen_layout(dtype: torch.dtype) -> torch.memory_format:
    """The layout of the activations and kernels on this CPU's chosen path (channels_last or not)."""
    return torch.channels_last if choice("channels_last", torch.device("cpu"), dtype) == "on" else torch.contiguous_format


def packing_calls(dtype: torch.dtype) -> dict:
    from .models.layers import linear, pack_convolution_weight, pack_linear_weight, packed_convolution

    layout = chosen_layout(dtype)
    # with the feed-forward's first product at 32x32: (1, 1024, 640) tokens, (2560, 640) weight
    tokens, weight = _random(dtype, 1, 1024, 640), _random(dtype, 2560, 640)
    packed_weight = pack_linear_weight(weight)

    def plain(x, kernel):
        return F.conv2d(x, kernel, padding=1)

    def packed(x, kernel):
        return packed_convolution(x, kernel, None, (1, 1))

    def calls(convolve, pack, linear_weight) -> list:
        """The step's part at 512x512, then one call at each of OTHER_SIZES, with the kernels made by `pack`."""
        cases = [(x, pack(kernel, x)) for x, kernel in convolution_cases(dtype, layout)]
        others = [functools.partial(convolve, x, pack(kernel, x)) for x, kernel in convolution_cases(dtype, layout, OTHER_SIZES)]

        def step():
            return [convolve(x, kernel) for x, kernel in cases] + [linear(tokens, linear_weight, None)]

        return [step] + others

    return {"off": calls(plain, lambda kernel, x: kernel, weight),
            "on": calls(packed, lambda kernel, x: pack_convolution_weight(kernel, (1, 1)), packed_weight),
            "sizes": calls(packed, lambda kernel, x: pack_convolution_weight(kernel, (1, 1), input_shape=x.shape), packed_weight)}


# (B, C, H, W) inputs of 3x3 convolutions where Winograd's algorithm would run (sd/models/winograd.py, suits): a
# quarter of the U-Net's guided top level at 512x512 (320 channels, 32 of 64 rows, one of the two latents), half of
# the second level's (640 channels, 32x32), the second level's at 256x256 (16x16: the fewest blocks it runs), and
# 16 rows of the decoder's top level (128 channels, the fewest it runs)
WINOGRAD_CONVOLUTIONS = ((1, 320, 32, 64), (1, 640, 32, 32), (2, 640, 16, 16), (1, 128, 16, 512))


def convolution_calls(dtype: torch.dtype) -> dict:
    from .models.layers import pack_convolution_weight, packed_convolution, scratch_buffer
    from .models.winograd import winograd_convolution

    cases = convolution_cases(dtype, chosen_layout(dtype), WINOGRAD_CONVOLUTIONS)
    scratch = functools.partial(scratch_buffer, device=torch.device("cpu"), dtype=dtype)  # the layers' own
    # without Winograd, as the chosen packing runs them: plain, each kernel packed for its input's shape (`sizes`), or
    # for one 8x8 input (`on`)
    packing = choice("packing", torch.device("cpu"), dtype)
    if packing == "off":
        direct = [functools.partial(F.conv2d, x, kernel, padding=1) for x, kernel in cases]
    else:
        packed = [(x, pack_convolution_weight(kernel, (1, 1), input_shape=x.shape if packing == "sizes" else None)) for x, kernel in cases]
        direct = [functools.partial(packed_convolution, x, kernel, None, (1, 1)) for x, kernel in packed]
    return {"direct": direct, "winograd": [functools.partial(winograd_convolution, x, kernel, None, scratch) for x, kernel in cases]}


TIMED_CALLS = {"attention": attention_calls, "packing": packing_calls, "linear": linear_calls, "channels_last": channels_last_calls,
               "convolution": convolution_calls}
# packing's plain path runs the chosen layout and linear path, and Winograd's algorithm is timed against the chosen
# packing: they are chosen first
TIMED_AFTER = {"packing": ("channels_last", "linear"), "convolution": ("channels_last", "packing")}
