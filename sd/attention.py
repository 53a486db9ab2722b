"""Multi-head attention, shared by CLIP, the U-Net and the VAE.

Both classes run `F.scaled_dot_product_attention`, which picks a fused kernel (flash or
memory-efficient) where one exists and never materialises the (L, L) score matrix on CPU.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Linear


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
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
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
        out = F.scaled_dot_product_attention(q, k, v)
        # (B, heads, L, C / heads) -> (B, L, C)
        return self.out_proj(_merge_heads(out))
