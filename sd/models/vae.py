"""Pieces shared by the VAE encoder and decoder: their sizes and their two kinds of block."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SelfAttention
from .layers import Conv2d, GroupNorm, Scratch, convolution_added, convolution_into


@dataclass(frozen=True)
class VAEConfig:
    image_channels: int = 3
    latent_channels: int = 4
    base_width: int = 128
    width_multipliers: tuple[int, ...] = (1, 2, 4, 4)  # one level per entry; each but the last halves H and W
    blocks_per_level: int = 2  # the decoder has one more per level
    num_groups: int = 32
    # latents are multiplied by this so that they have roughly unit variance (original config: scale_factor)
    scale_factor: float = 0.18215

    @property
    def widths(self) -> list[int]:
        return [self.base_width * m for m in self.width_multipliers]


def group_norm(config: VAEConfig, channels: int) -> GroupNorm:
    return GroupNorm(config.num_groups, channels, eps=1e-6)


class ResidualBlock(nn.Module):
    def __init__(self, config: VAEConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(config, in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(config, out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1x1 convolution matches the channels of the shortcut when they change.
        self.shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H, W); x is consumed (the VAE keeps no block's input). With `scratch`
        (inference on a CPU), the temporaries are its tensors, which the next block of the same size reuses."""
        if scratch is not None:
            return self.forward_in_scratch(x, scratch)
        # in place where a temporary would otherwise be the largest tensor alive (the decoder at full size)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = F.silu(self.norm2(h), inplace=True)
        # conv2's sums go into the shortcut's, which is x itself where the widths match
        return convolution_added(self.conv2, h, self.shortcut(x))

    def forward_in_scratch(self, x: torch.Tensor, scratch: Scratch) -> torch.Tensor:
        total = self.shortcut(x)
        # where the widths differ, the shortcut was x's last reader: x is normalised in place
        normalised = scratch.tensor("norm", x.shape, like=x) if total is x else x
        h = F.silu(self.norm1.into(x, normalised), inplace=True)
        h = convolution_into(self.conv1, h, scratch, "conv")
        h = F.silu(self.norm2.into(h, h), inplace=True)
        return convolution_added(self.conv2, h, total)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels, used once at the lowest resolution."""

    def __init__(self, config: VAEConfig, channels: int):
        super().__init__()
        self.norm = group_norm(config, channels)
        self.attention = SelfAttention(channels, num_heads=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # (B, C, H, W) -> (B, H * W, C)
        h = self.norm(x).flatten(2).transpose(1, 2)
        h = self.attention(h)
        # (B, H * W, C) -> (B, C, H, W)
        return x + h.transpose(1, 2).reshape(batch, channels, height, width)


class MidBlock(nn.Module):
    def __init__(self, config: VAEConfig, channels: int):
        super().__init__()
        self.block_1 = ResidualBlock(config, channels, channels)
        self.attn_1 = AttentionBlock(config, channels)
        self.block_2 = ResidualBlock(config, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))
