"""The diffusion U-Net: predicts the noise in a latent image, given the time step and the text context."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CrossAttention, SelfAttention
from .layers import Conv2d, GroupNorm, LayerNorm, Linear, Upsample, cast_to, linear, pack_linear_weight


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 9 for inpainting checkpoints: latents, mask and masked-image latents
    out_channels: int = 4
    base_width: int = 320
    width_multipliers: tuple[int, ...] = (1, 2, 4, 4)  # one level per entry; each but the last halves H and W
    attention_levels: tuple[int, ...] = (0, 1, 2)
    blocks_per_level: int = 2  # the decoder half has one more per level
    num_heads: int = 8
    context_width: int = 768
    num_groups: int = 32
    sample_size: int = 64  # the latents' side it was trained at: 64 (512x512 images) for SD 1.5

    @property
    def time_width(self) -> int:
        return 4 * self.base_width


def group_norm(config: UNetConfig, channels: int, eps: float = 1e-5) -> GroupNorm:
    return GroupNorm(config.num_groups, channels, eps=eps)


def timestep_embedding(timesteps: torch.Tensor, width: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of the time step: cosines then sines over geometric frequencies."""
    half = width // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    # (B,) x (half,) -> (B, half)
    angles = timesteps.float()[:, None] * frequencies[None, :]
    # (B, half) -> (B, width)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimeEmbedding(nn.Module):
    def __init__(self, width: int, time_width: int):
        super().__init__()
        self.linear_1 = Linear(width, time_width)
        self.linear_2 = Linear(time_width, time_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 320) -> (B, 1280)
        return self.linear_2(F.silu(self.linear_1(x)))


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with the time embedding added between them."""

    def __init__(self, config: UNetConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(config, in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = Linear(config.time_width, out_channels)
        self.norm2 = group_norm(config, out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        # (B, C_in, H, W) -> (B, C_out, H, W); in place on temporaries, which saves allocating (and
        # page-faulting in) a new tensor for each
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        # (B, 1280) -> (B, C_out, 1, 1), broadcast over every pixel
        h += self.time_proj(F.silu(time))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(self.shortcut(x))


class GEGLU(nn.Module):
    """Feed-forward layer with a GELU-gated hidden layer 4x wider than the input."""

    def __init__(self, width: int):
        super().__init__()
        self.proj_in = Linear(width, 8 * width)  # the hidden layer's weights, then the gate's
        self.proj_out = Linear(4 * width, width)
        self.packed: tuple[torch.Tensor, ...] | None = None  # see pack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden_weight, hidden_bias, gate_weight, gate_bias = self.halves()
        # (B, L, C) -> (B, L, 4C) twice: the gate, then the hidden layer. Two products rather than one over the
        # whole weight: each output is then contiguous, faster to gate and to multiply by proj_out than strided
        # views, and a packed one can take the GELU into its product.
        gate = linear(x, gate_weight, gate_bias, gelu=True)
        hidden = linear(x, hidden_weight, hidden_bias)
        # (B, L, 4C) -> (B, L, C)
        return self.proj_out(hidden.mul_(gate))

    def halves(self) -> tuple[torch.Tensor, ...]:
        """The hidden layer's weight and bias, then the gate's."""
        if self.packed is not None:
            return self.packed
        (hidden_weight, gate_weight), (hidden_bias, gate_bias) = self.proj_in.weight.chunk(2), self.proj_in.bias.chunk(2)
        return hidden_weight, hidden_bias, gate_weight, gate_bias

    def pack(self, dtype: torch.dtype) -> None:
        """Keeps the two halves of proj_in in `dtype`, each packed for oneDNN (a packed weight has no halves to
        take), in place of proj_in, which is dropped (see sd/models/layers.py, pack_weights)."""
        hidden_weight, hidden_bias, gate_weight, gate_bias = self.halves()
        # each half cast into the scratch buffer and packed before the next is cast there
        hidden_weight, gate_weight = (pack_linear_weight(cast_to(dtype, weight)[0]) for weight in (hidden_weight, gate_weight))
        self.packed = hidden_weight, hidden_bias.to(dtype), gate_weight, gate_bias.to(dtype)
        del self.proj_in


class TransformerBlock(nn.Module):
    def __init__(self, config: UNetConfig, width: int):
        super().__init__()
        self.norm1 = LayerNorm(width)
        self.self_attention = SelfAttention(width, config.num_heads, in_proj_bias=False)
        self.norm2 = LayerNorm(width)
        self.cross_attention = CrossAttention(width, config.context_width, config.num_heads)
        self.norm3 = LayerNorm(width)
        self.feed_forward = GEGLU(width)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # (B, H * W, C) throughout
        x = x + self.self_attention(self.norm1(x))
        x = x + self.cross_attention(self.norm2(x), context)
        return x + self.feed_forward(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Lets every pixel attend to the others and to the text, as a sequence of H * W tokens."""

    def __init__(self, config: UNetConfig, width: int):
        super().__init__()
        self.norm = group_norm(config, width, eps=1e-6)
        self.proj_in = Conv2d(width, width, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(config, width)])
        self.proj_out = Conv2d(width, width, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.proj_in(self.norm(x))
        # (B, C, H, W) -> (B, H * W, C)
        h = h.flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            h = block(h, context)
        # (B, H * W, C) -> (B, C, H, W)
        h = h.transpose(1, 2).reshape(batch, channels, height, width)
        return self.proj_out(h).add_(x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, C, H / 2, W / 2)
        return self.conv(x)


class Stage(nn.ModuleList):
    """A few layers run in order, each given what it needs: the time, the context, the size to upsample to, or
    none of these."""

    def forward(self, x: torch.Tensor, time: torch.Tensor, context: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResidualBlock):
                x = layer(x, time)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


def encoder_stages(config: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The U-Net's encoder half (a ControlNet's too): its stages, and the width of each one's output, which the
    decoder half takes as a skip connection."""
    widths = [config.base_width * m for m in config.width_multipliers]
    stages = nn.ModuleList([Stage([Conv2d(config.in_channels, widths[0], 3, padding=1)])])
    skip_widths = [widths[0]]
    width = widths[0]
    for level, level_width in enumerate(widths):
        for _ in range(config.blocks_per_level):
            layers = [ResidualBlock(config, width, level_width)]
            width = level_width
            if level in config.attention_levels:
                layers.append(SpatialTransformer(config, width))
            stages.append(Stage(layers))
            skip_widths.append(width)
        if level < len(widths) - 1:
            stages.append(Stage([Downsample(width)]))
            skip_widths.append(width)
    return stages, skip_widths


def middle_stage(config: UNetConfig, width: int) -> Stage:
    return Stage([ResidualBlock(config, width, width), SpatialTransformer(config, width), ResidualBlock(config, width, width)])


def embed_time(time_embedding: TimeEmbedding, timesteps: torch.Tensor | int, latents: torch.Tensor, base_width: int) -> torch.Tensor:
    """The time embedding of each latent image of the batch, in the latents' dtype: (B,) -> (B, 320) -> (B, 1280)."""
    timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
    return time_embedding(timestep_embedding(timesteps, base_width).to(latents.dtype))


class UNet(nn.Module):
    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        widths = [config.base_width * m for m in config.width_multipliers]
        self.time_embedding = TimeEmbedding(config.base_width, config.time_width)
        self.input_blocks, skip_widths = encoder_stages(config)
        width = skip_widths[-1]
        self.middle_block = middle_stage(config, width)

        # Decoder half: each stage takes one skip connection, concatenated along the channels.
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(widths))):
            for block in range(config.blocks_per_level + 1):
                layers = [ResidualBlock(config, width + skip_widths.pop(), widths[level])]
                width = widths[level]
                if level in config.attention_levels:
                    layers.append(SpatialTransformer(config, width))
                if level > 0 and block == config.blocks_per_level:
                    layers.append(Upsample(width))
                self.output_blocks.append(Stage(layers))

        self.norm_out = group_norm(config, width)
        self.conv_out = Conv2d(width, config.out_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, timesteps: torch.Tensor | int,
                control: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`control`: ControlNets' residuals (sd/models/controlnet.py), one per skip connection and the last for the
        middle block, added to them."""
        time = embed_time(self.time_embedding, timesteps, latents, self.config.base_width)
        x = latents
        skips = []
        # (B, 4, h, w) -> (B, 1280, h / 8, w / 8)
        for stage in self.input_blocks:
            x = stage(x, time, context)
            skips.append(x)
        x = self.middle_block(x, time, context)
        if control is not None:
            skips = [skip + residual for skip, residual in zip(skips, control)]
            x = x + control[-1]
        # (B, 1280, h / 8, w / 8) -> (B, 320, h, w)
        for stage in self.output_blocks:
            x = torch.cat([x, skips.pop()], dim=1)
            # an upsampling stage grows x to the size of the skip it meets next: twice its own, or one less on a
            # side whose halving rounded up on the way down (9 -> 5 latents: back up 5 -> 9)
            x = stage(x, time, context, skips[-1].shape[-2:] if skips else None)
        # (B, 320, h, w) -> (B, 4, h, w)
        return self.conv_out(F.silu(self.norm_out(x)))
