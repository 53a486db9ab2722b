"""Which dtype the weights are stored in, and which one each model computes in.

The two differ where the device has no fast arithmetic for the stored type (see sd/models/layers.py):
- CPU: bf16 or fp16 weights compute in fp32 unless the CPU has bf16 instructions (AVX512-BF16 or
  AMX), because without them PyTorch falls back to reference kernels about 10x slower than fp32.
- CUDA and MPS: fp16 weights compute in fp16, except the VAE, which computes in fp32: SD's VAE
  decoder overflows fp16 on some images (NaN, then a black image); it is a small share of the time.
"""

import torch

from .errors import SDError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = ["auto", *DTYPES]


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 arithmetic natively (oneDNN's own check of AVX512-BF16 / AMX)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def weights_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype to load the weights in; "auto" (or None): fp16 on CUDA, bf16 on a CPU with bf16
    instructions, else fp32."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else torch.float32
    if name not in DTYPES:
        raise SDError(f"unknown dtype {name!r}: use one of {', '.join(DTYPE_NAMES)}")
    return DTYPES[name]


def compute_dtype(weights: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the text encoder and U-Net compute in, given the weights' dtype."""
    if device.type == "cpu" and weights != torch.float32 and not (weights == torch.bfloat16 and cpu_has_bf16()):
        return torch.float32
    return weights


def vae_dtype(weights: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the VAE computes in: as the U-Net, but never fp16."""
    compute = compute_dtype(weights, device)
    return torch.float32 if compute == torch.float16 else compute
