"""Layers whose weights may be stored in a narrower type than the one they compute in.

Each layer computes in the dtype of its input and casts its weights to it on use. So a model stored
in bf16 (half the memory) runs in fp32 on a CPU without bf16 instructions, where bf16 arithmetic is
about 10x slower than fp32, and a VAE stored in fp16 decodes in fp32 on CUDA, where fp16 overflows.
When the dtypes already match, nothing is cast.

The cast goes into one scratch buffer per thread, device and dtype, reused by every layer: a fresh
allocation for each weight costs page faults that made a bf16-stored U-Net step a third slower on
CPU. The cast weights live only during the layer's call, which is safe because no weight of ours
takes part in autograd (the models are loaded with requires_grad False).
"""

import threading

import torch
import torch.nn.functional as F
from torch import nn

_scratch = threading.local()


def cast_to(dtype: torch.dtype, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors in `dtype`: themselves if already so, else copies in the scratch buffer, laid out
    with their own strides (so channels_last weights stay channels_last)."""
    if all(t is None or t.dtype == dtype for t in tensors):
        return list(tensors)
    device = next(t.device for t in tensors if t is not None)
    needed = sum(t.numel() for t in tensors if t is not None)
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get((device, dtype))
    if buffer is None or buffer.numel() < needed:
        # an ordinary tensor, not an inference one: those cannot be written outside torch.inference_mode()
        with torch.inference_mode(False):
            buffer = buffers[(device, dtype)] = torch.empty(needed, dtype=dtype, device=device)
    cast, offset = [], 0
    for tensor in tensors:
        if tensor is None:
            cast.append(None)
            continue
        view = buffer.as_strided(tensor.shape, tensor.stride(), offset)
        cast.append(view.copy_(tensor))
        offset += tensor.numel()
    return cast


def release_scratch() -> None:
    """Frees this thread's cast buffers (a stage done with its weights need not keep the largest one's copy)."""
    _scratch.__dict__.pop("buffers", None)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *cast_to(x.dtype, self.weight, self.bias))


class Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, *cast_to(x.dtype, self.weight, self.bias))


class GroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, *cast_to(x.dtype, self.weight, self.bias), self.eps)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, *cast_to(x.dtype, self.weight, self.bias), self.eps)
