"""Multi-head attention, shared by CLIP, the U-Net and the VAE.

Both classes run `attend`: `F.scaled_dot_product_attention`, which picks a fused kernel (flash or
memory-efficient) where one exists and never materialises the (L, L) score matrix, or, on a CPU where that is
faster (sd/kernels.py decides), plain matrix products over cache-sized pieces of the scores.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import X86_ONEDNN, choice
from .layers import Linear


# Scores of one attention piece: 2^21 bf16 values (4 MiB), about what the L2 caches hold.
PIECE_SCORES = 2**21


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, L, d) tensors.

    In bf16 on a Zen 5, PyTorch's fused kernel reached about 150 GFLOP/s with SD's 40-wide heads; plain
    matrix products over pieces whose scores stay in cache ran 1.3x (77 text tokens) to 2.6x (1,024
    image tokens) faster; in fp32, with oneDNN's products (by_rows), 1.5-2.0x for the U-Net's self-attention. The
    pieces have no causal mask (CLIP's), which stays with the fused kernel, and no gradients: they write into
    outputs made beforehand and divide by sums in place, so attention that autograd records (training) does too.
    """
    recorded = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not causal and not recorded and choice("attention", q.device, q.dtype) == "pieces":
        return attend_in_pieces(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def attend_in_pieces(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """attend's plain matrix products, PIECE_SCORES scores at a time. In bf16 the scores are rounded to bf16
    before the softmax, where the fused kernel keeps fp32: see benchmarks/README.md for what that does to the
    image."""
    width, value_width = q.shape[-1], v.shape[-1]
    # Not fp16, whose powers of 2 stop at 2^15. Heads whose values need no padding would need 16 more columns for
    # the sums: 80 wide in bf16 on a Zen 4, 23.5 against 21.9 ms.
    if q.dtype in (torch.bfloat16, torch.float32) and value_width % 16:
        out = attend_by_powers_of_two(q, k, v)
        if out is not None:
            return out
    # Values padded with zero columns to a multiple of 16: SD's 40-wide heads as 48 make the scores-by-values
    # product 1.5x faster on AVX512-BF16 (a copy of the values per call, and a view of the output to undo it).
    if value_width % 16:
        v = F.pad(v, (0, -value_width % 16))
    # (B, heads, L_k, d), the scale folded into the keys
    keys = k * width**-0.5
    return _weighted_values(q, keys, v, lambda scores: scores.softmax(dim=-1))[..., :value_width]


def attend_by_powers_of_two(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """attend_in_pieces with 2^scores (in log2 units) in place of the softmax: one pass over each piece of scores
    instead of the softmax's three. The values are padded to a multiple of 16 columns (as attend_in_pieces does),
    the first padding column ones, so that the product with the powers also gives each row's sum, divided out at
    the end. A 64x64 self-attention in bf16 on a Zen 4: 181 ms against 204; in fp32 on a Zen 5, 135 ms against the
    fused kernel's 273. None where powers or sums overflow (past 2^128): the caller then takes the softmax."""
    width, value_width = q.shape[-1], v.shape[-1]
    # The keys less their mean: every score of a query moves by the same amount, which the softmax ignores, and
    # the scores of each query average 0, so the largest power is at least about 1 and the sums never underflow.
    # (B, heads, L_k, d), the scale and log2(e) folded in
    centred = k.to(torch.float32, copy=True)  # in fp32: rounded to k's dtype once, when scaled
    centred -= centred.mean(dim=-2, keepdim=True)
    keys = (centred * (width**-0.5 * math.log2(math.e))).to(k.dtype)
    # (B, heads, L_k, d) -> (B, heads, L_k, padded d)
    values = F.pad(v, (0, 16 - value_width % 16))
    values[..., value_width] = 1
    out = _weighted_values(q, keys, values, torch.Tensor.exp2_)
    sums = out[..., value_width : value_width + 1]
    # each weighted value is at most its row's sum times the largest value
    if not sums.isfinite().all() or sums.amax().item() * v.abs().amax().item() >= torch.finfo(out.dtype).max:
        return None
    # (B, heads, L, padded d) -> (B, heads, L, d), in place: each row's weighted values over its sum of powers
    return out[..., :value_width].div_(sums)


def _weighted_values(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, weigh) -> torch.Tensor:
    """weigh(q keys^T) values, with (B, heads, L, d) queries, (B, heads, L_k, d) keys and (B, heads, L_k, d_v) values,
    PIECE_SCORES scores at a time."""
    batch, heads, length, _ = q.shape
    rows = max(1, PIECE_SCORES // keys.shape[-2])
    out = q.new_empty(batch, heads, length, values.shape[-1])
    # (B, heads, L_k, d_v) -> (B, heads, d_v, L_k): both right-hand matrices as rows (by_rows)
    values = values.transpose(-1, -2)
    if onednn_products(q):
        keys, values = keys.contiguous(), values.contiguous()
    for b in range(batch):
        for h in range(heads):
            for start in range(0, length, rows):
                # (rows, d) x (d, L_k) -> (rows, L_k) -> (rows, d_v)
                scores = weigh(by_rows(q[b, h, start : start + rows], keys[b, h]))
                by_rows(scores, values[b, h], out=out[b, h, start : start + rows])
                # freed before the next piece's are made, so that glibc reuses one block: kept, two blocks took
                # turns and the one at the heap's top was trimmed and faulted in again (fp32 on a Zen 5: 21 ms a head, 10)
                del scores
    return out


def onednn_products(x: torch.Tensor) -> bool:
    """Whether by_rows runs oneDNN's product for `x`: fp32 on an x86 CPU, where torch.mm runs MKL's, which on a Zen 5
    was half as fast for the attention's pieces (a piece's scores 0.88 ms against 0.43, its weighted values 1.08
    against 0.44). bf16's torch.mm runs oneDNN already."""
    return X86_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32


def by_rows(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a b^T for matrices a (M, K) and b (N, K), into `out` where given. With oneDNN, b is taken as a linear
    layer's weight, which must be contiguous."""
    if onednn_products(a):
        product = torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
        return product if out is None else out.copy_(product)
    return torch.mm(a, b.t(), out=out)


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    # (B, L, C) -> (B, heads, L, C / heads)
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, num_heads, length, head_width = x.shape
    # (B, heads, L, C / heads) -> (B, L, C)
    return x.transpose(1, 2).reshape(batch, length, num_heads * head_width)


class SelfAttention(nn.Module):
    """Self-attention with one fused projection for queries, keys and values."""

    def __init__(self, width: int, num_heads: int, in_proj_bias: bool = True, out_proj_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj = Linear(width, 3 * width, bias=in_proj_bias)
        self.out_proj = Linear(width, width, bias=out_proj_bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        # (B, L, C) -> 3 x (B, L, C)
        q, k, v = self.in_proj(x).chunk(3, dim=-1)
        q, k, v = (_split_heads(t, self.num_heads) for t in (q, k, v))
        # (B, heads, L, C / heads)
        out = attend(q, k, v, causal)
        # (B, heads, L, C / heads) -> (B, L, C)
        return self.out_proj(_merge_heads(out))


class CrossAttention(nn.Module):
    """Queries from the image tokens, keys and values from the text context."""

    def __init__(self, width: int, context_width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = Linear(width, width, bias=False)
        self.k_proj = Linear(context_width, width, bias=False)
        self.v_proj = Linear(context_width, width, bias=False)
        self.out_proj = Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: (B, L, C), context: (B, 77, 768) -> (B, heads, L or 77, C / heads)
        q = _split_heads(self.q_proj(x), self.num_heads)
        k = _split_heads(self.k_proj(context), self.num_heads)
        v = _split_heads(self.v_proj(context), self.num_heads)
        out = attend(q, k, v)
        # (B, heads, L, C / heads) -> (B, L, C)
        return self.out_proj(_merge_heads(out))
