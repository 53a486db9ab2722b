"""VAE decoder: scaled latents -> an image in about [-1, 1], 8 times larger."""

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv2d, cast_to
from .vae import LATENT_SCALE, MidBlock, ResidualBlock, VAEConfig, group_norm


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution, computed without the upsampled image.

    Each output pixel of a given parity (row and column odd or even) sees only 2x2 distinct input pixels,
    so the 3x3 kernel folds into four 2x2 kernels applied at the input's resolution: 16 instead of 36
    multiply-adds per input pixel and channel pair, and no 4x-sized intermediate. It is the same sum in
    another order (fp32 results agree to rounding).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        weight, bias = cast_to(x.dtype, self.conv.weight, self.conv.bias)
        rows = fold_taps(weight, dim=2)
        # (B, C, H, W) -> (B, C, 2H, 2W), filled a quarter (one row and column parity) at a time
        out = torch.empty(batch, weight.shape[0], 2 * height, 2 * width, dtype=x.dtype, device=x.device, memory_format=layout_of(x))
        for row in (0, 1):
            kernels = fold_taps(rows[row], dim=3)
            for col in (0, 1):
                # (B, C, H, W) -> (B, C, H + 1, W + 1), whose output (i + row, j + col) saw the input pixels
                # (i - 1 + row .. i + row, j - 1 + col .. j + col): the upsampled image's output (2i + row, 2j + col)
                phase = F.conv2d(x, kernels[col], bias, padding=1)
                out[:, :, row::2, col::2] = phase[:, :, row : row + height, col : col + width]
        return out


def fold_taps(weight: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3-tap kernel along `dim` as the two 2-tap kernels that act on a 2x-nearest-upsampled input:
    even outputs see input pixels (i-1, i) with taps (w0, w1 + w2), odd ones (i, i+1) with (w0 + w1, w2)."""
    w0, w1, w2 = weight.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def layout_of(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else torch.contiguous_format


class DecoderLevel(nn.Module):
    """The blocks of one resolution, then 2x upsampling (none at full resolution); Decoder.forward runs them."""

    def __init__(self, config: VAEConfig, in_channels: int, out_channels: int, upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * (config.blocks_per_level + 1)
        self.block = nn.ModuleList(ResidualBlock(config, a, b) for a, b in zip(widths, widths[1:]))
        self.upsample = Upsample(out_channels) if upsample else nn.Identity()


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        widths = config.widths
        last = len(widths) - 1
        self.post_quant_conv = Conv2d(config.latent_channels, config.latent_channels, 1)
        self.conv_in = Conv2d(config.latent_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(config, widths[-1])
        # Indexed like the encoder's levels (0 = full resolution) and run from the last to the first.
        self.up = nn.ModuleList(
            DecoderLevel(config, widths[min(i + 1, last)], widths[i], upsample=i > 0) for i in range(len(widths))
        )
        self.norm_out = group_norm(config, widths[0])
        self.conv_out = Conv2d(widths[0], config.image_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        # (B, 4, h, w) -> (B, 512, h, w)
        x = self.conv_in(self.post_quant_conv(latents / LATENT_SCALE))
        x = self.mid(x)
        # (B, 512, h, w) -> (B, 128, 8h, 8w)
        # The blocks run from this loop rather than from a level's forward, whose caller would keep the
        # level's input (256 MiB at 512x512) alive until the whole level is done.
        for level in reversed(self.up):
            for block in level.block:
                x = block(x)
            x = level.upsample(x)
        # (B, 128, 8h, 8w) -> (B, 3, 8h, 8w)
        return self.conv_out(F.silu(self.norm_out(x)))
