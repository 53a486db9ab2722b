"""VAE decoder: scaled latents -> an image in about [-1, 1], 8 times larger."""

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv2d, Upsample, scratch_for, trim_heap
from .tiling import check_tile_size, run_tiled
from .vae import MidBlock, ResidualBlock, VAEConfig, group_norm


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
        self.config = config
        self.scale_factor = config.scale_factor
        self.upscale = 2**last  # every level but the full-resolution one doubles the sides
        self.post_quant_conv = Conv2d(config.latent_channels, config.latent_channels, 1)
        self.conv_in = Conv2d(config.latent_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(config, widths[-1])
        # Indexed like the encoder's levels (0 = full resolution) and run from the last to the first.
        self.up = nn.ModuleList(
            DecoderLevel(config, widths[min(i + 1, last)], widths[i], upsample=i > 0) for i in range(len(widths))
        )
        self.norm_out = group_norm(config, widths[0])
        self.conv_out = Conv2d(widths[0], config.image_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor, tiled: bool = False, tile_size: int = 64) -> torch.Tensor:
        """(B, 4, h, w) scaled latents -> (B, 3, 8h, 8w). With `tiled`, latents larger than `tile_size` (a
        multiple of 4) on a side are decoded in overlapping tiles of that many latents, blended as diffusers'
        enable_tiling() does (sd/models/tiling.py), so the memory beyond the output is that of one tile; latents no
        larger than one tile are decoded whole, exactly as without `tiled`."""
        if not tiled:
            return self.decode(latents)
        check_tile_size(tile_size)
        # (B, 4, h, w) -> (B, 3, 8h, 8w)
        return run_tiled(self.decode, latents, tile_size, scale=self.upscale)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The whole of `latents` at once."""
        # (B, 4, h, w) -> (B, 512, h, w)
        x = self.conv_in(self.post_quant_conv(latents / self.scale_factor))
        x = self.mid(x)
        # (B, 512, h, w) -> (B, 128, 8h, 8w)
        # The blocks run from this loop rather than from a level's forward, whose caller would keep the
        # level's input (256 MiB at 512x512) alive until the whole level is done.
        on_cpu = x.device.type == "cpu"
        # a level's blocks share their temporaries (Scratch): a 512x512 bf16 decode page-faults in 1.1 GiB less
        # (420,000 faults -> 145,000) and takes 0.93x the time (Zen 5)
        scratch = scratch_for(x)
        for level in reversed(self.up):
            for layer in level.block:
                x = layer(x, scratch)
                if on_cpu:
                    # what each layer makes afresh differs in size from the last one's, so the heap seldom
                    # reuses it: trimmed, a 512x512 decode peaks 0.15 GiB lower, in the same time
                    trim_heap()
            if scratch is not None:
                scratch.clear()  # before the upsampling's output, 4 times their size
            x = level.upsample(x)
            if on_cpu:
                trim_heap()
        # (B, 128, 8h, 8w) -> (B, 3, 8h, 8w), normalised in place with scratch: x is ours
        out = self.norm_out(x) if scratch is None else self.norm_out.into(x, x)
        return self.conv_out(F.silu(out, inplace=True))
