"""VAE encoder: an image in [-1, 1] -> scaled latents at 1/8 of its size."""

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv2d, scratch_for
from .tiling import check_tile_size, run_tiled
from .vae import MidBlock, ResidualBlock, VAEConfig, group_norm


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pad right and bottom only (as trained), so (B, C, H, W) -> (B, C, H / 2, W / 2).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class EncoderLevel(nn.Module):
    """The blocks of one resolution, then 2x downsampling (none at the lowest); Encoder.forward runs them."""

    def __init__(self, config: VAEConfig, in_channels: int, out_channels: int, downsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * config.blocks_per_level
        self.block = nn.ModuleList(ResidualBlock(config, a, b) for a, b in zip(widths, widths[1:]))
        self.downsample = Downsample(out_channels) if downsample else nn.Identity()


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        widths = config.widths
        last = len(widths) - 1
        self.config = config
        self.scale_factor = config.scale_factor
        self.downscale = 2**last  # every level but the lowest halves the sides
        self.conv_in = Conv2d(config.image_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList(
            EncoderLevel(config, widths[max(i - 1, 0)], widths[i], downsample=i < last) for i in range(len(widths))
        )
        self.mid = MidBlock(config, widths[-1])
        self.norm_out = group_norm(config, widths[-1])
        # Predicts the mean and the log-variance of each latent channel.
        self.conv_out = Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)
        self.quant_conv = Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)

    def forward(self, image: torch.Tensor, noise: torch.Tensor, tiled: bool = False, tile_size: int = 64) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] and (B, 4, H / 8, W / 8) noise -> scaled latents. With `tiled`, see moments."""
        # 2 x (B, 4, H / 8, W / 8)
        mean, log_variance = self.moments(image, tiled, tile_size)
        std = torch.exp(0.5 * log_variance.clamp(-30.0, 20.0))
        # Sample the posterior with the caller's noise, so results are reproducible.
        return (mean + std * noise) * self.scale_factor

    def moments(self, image: torch.Tensor, tiled: bool = False, tile_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and the log-variance of the posterior of each latent. With `tiled`, an image larger than
        `tile_size` latents (a multiple of 4; times 8 pixels) on a side is encoded in overlapping tiles whose
        moments are blended as diffusers' enable_tiling() does (sd/models/tiling.py), so the memory beyond the result
        is that of one tile; an image no larger than one tile is encoded whole, exactly as without `tiled`."""
        if tiled:
            check_tile_size(tile_size)
            # (B, 3, H, W) -> (B, 8, H / 8, W / 8)
            moments = run_tiled(self.stacked_moments, image, tile_size * self.downscale, scale=1 / self.downscale)
        else:
            moments = self.stacked_moments(image)
        # (B, 8, H / 8, W / 8) -> 2 x (B, 4, H / 8, W / 8)
        return moments.chunk(2, dim=1)

    def stacked_moments(self, image: torch.Tensor) -> torch.Tensor:
        """The mean and the log-variance stacked on the channels, of the whole image at once."""
        # (B, 3, H, W) -> (B, 128, H, W)
        x = self.conv_in(image)
        # (B, 128, H, W) -> (B, 512, H / 8, W / 8)
        # run from here, not from a level's forward, whose caller would keep the level's input alive throughout
        scratch = scratch_for(x)  # the blocks of a level share their temporaries
        for level in self.down:
            for block in level.block:
                x = block(x, scratch)
            if scratch is not None:
                scratch.clear()  # not kept through the downsampling
            x = level.downsample(x)
        x = self.mid(x)
        # (B, 512, H / 8, W / 8) -> (B, 8, H / 8, W / 8)
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(x))))
