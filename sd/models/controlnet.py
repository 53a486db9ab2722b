"""ControlNet (Zhang et al., 2023): a trainable copy of the U-Net's encoder half that reads a control image (an
edge map, a depth map, a pose) and steers the U-Net towards its layout.

A small convolutional "hint" encoder brings the control image down to the latents' size; its features are added
after the copy's first stage. A 1x1 convolution (zero at the start of training) out of each encoder stage and out
of the middle block gives one residual per skip connection of the U-Net and one for its middle block, which the
U-Net adds to them (sd/models/unet.py, UNet.forward).
"""

from dataclasses import dataclass

import torch
from torch import nn

from .unet import TimeEmbedding, UNetConfig, embed_time, encoder_stages, middle_stage
from .layers import Conv2d

# The hint encoder's widths; the last convolution goes on to the U-Net's base width. Those marked 2 halve H and W.
HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)
HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2)


class HintEncoder(nn.Sequential):
    """3x3 convolutions with SiLU between them, numbered as in the original (convolutions at even indices):
    (B, 3, H, W) -> (B, base width, H / 8, W / 8)."""

    def __init__(self, in_channels: int, width: int):
        layers, channels = [], in_channels
        for out_channels, stride in zip(HINT_WIDTHS, HINT_STRIDES):
            layers += [Conv2d(channels, out_channels, 3, stride=stride, padding=1), nn.SiLU()]
            channels = out_channels
        super().__init__(*layers, Conv2d(channels, width, 3, padding=1))


class ControlNet(nn.Module):
    def __init__(self, config: UNetConfig = UNetConfig(), hint_channels: int = 3):
        super().__init__()
        self.config = config
        self.time_embedding = TimeEmbedding(config.base_width, config.time_width)
        self.input_blocks, skip_widths = encoder_stages(config)
        self.middle_block = middle_stage(config, skip_widths[-1])
        self.hint = HintEncoder(hint_channels, config.base_width)
        self.zero_convs = nn.ModuleList([Conv2d(width, width, 1) for width in skip_widths])
        self.middle_out = Conv2d(skip_widths[-1], skip_widths[-1], 1)

    def encode_hint(self, image: torch.Tensor) -> torch.Tensor:
        """The control image's features, which do not change from step to step: (1, 3, H, W) in [0, 1] ->
        (1, 320, H / 8, W / 8)."""
        return self.hint(image)

    def forward(self, latents: torch.Tensor, hint: torch.Tensor, context: torch.Tensor, timesteps: torch.Tensor | float) -> list[torch.Tensor]:
        """The residuals for the U-Net's skip connections, then the one for its middle block (13 for SD 1.5), each
        the size of what it is added to. `hint`: encode_hint's features, for one image or the whole batch."""
        time = embed_time(self.time_embedding, timesteps, latents, self.config.base_width)
        x, residuals = latents, []
        for index, (stage, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            x = stage(x, time, context)
            if index == 0:
                x = x + hint  # (B, 320, h, w) + (1 or B, 320, h, w)
            residuals.append(zero_conv(x))
        x = self.middle_block(x, time, context)
        residuals.append(self.middle_out(x))
        return residuals


def compatible(controlnet: ControlNet, unet_config: UNetConfig) -> bool:
    """Whether the ControlNet's residuals fit the U-Net's skip connections (it may take 4 input channels where an
    inpainting U-Net takes 9)."""
    ours, theirs = controlnet.config, unet_config
    return (ours.base_width, ours.width_multipliers, ours.blocks_per_level, ours.context_width) == (
        theirs.base_width, theirs.width_multipliers, theirs.blocks_per_level, theirs.context_width)


@dataclass
class Guide:
    """One ControlNet at work in a sampling pass."""

    model: ControlNet
    hint: torch.Tensor  # encode_hint's features of the control image
    strength: float
    start: float  # the share of the pass's steps before the ControlNet starts
    end: float  # and after which it stops
    guess_mode: bool  # with guidance: the conditional half alone is guided, the residuals scaled as diffusers does

    def active(self, call: int, calls: int) -> bool:
        """Whether U-Net call `call` (from 0) of `calls` lies within the guide's share of the pass: as diffusers
        counts it, the call's own share, from call / calls to (call + 1) / calls, must."""
        return self.start <= call / calls and (call + 1) / calls <= self.end

    def scales(self) -> list[float]:
        """Each residual's scale: the strength, or in guess mode diffusers' strength times 0.1 (the first skip
        connection) up to 1 (the middle block) on a log scale, so that the deep, coarse residuals weigh most."""
        count = len(self.model.zero_convs) + 1
        if self.guess_mode:
            # float32, as diffusers computes them
            return [self.strength * scale for scale in torch.logspace(-1, 0, count).tolist()]
        return [self.strength] * count


class Control:
    """The ControlNets of a sampling pass, called by the noise predictor (sd/pipeline.py) at each U-Net call for
    the residuals to add to the U-Net's: the sum of every active ControlNet's, or None when none is active.
    `calls`: the U-Net calls the pass counts (as prompt editing counts them)."""

    def __init__(self, guides: list[Guide], calls: int):
        self.guides, self.calls = guides, calls

    def __call__(self, latents: torch.Tensor, context: torch.Tensor, timestep, call: int, guided: bool) -> list[torch.Tensor] | None:
        total = None
        for guide in self.guides:
            if not guide.active(call, self.calls):
                continue
            residuals = [residual * scale for residual, scale in zip(self.residuals(guide, latents, context, timestep, guided), guide.scales())]
            total = residuals if total is None else [a + b for a, b in zip(total, residuals)]
        return total

    @staticmethod
    def residuals(guide: Guide, latents: torch.Tensor, context: torch.Tensor, timestep, guided: bool) -> list[torch.Tensor]:
        if not (guide.guess_mode and guided):
            return guide.model(latents, guide.hint, context, timestep)
        # guess mode: the unconditional half (the first B rows) gets no control, as in diffusers
        half = len(latents) // 2
        # (B, 4, h, w) -> 13 x (B, C, h', w') -> 13 x (2B, C, h', w')
        conditional = guide.model(latents[half:], guide.hint, context[half:], timestep)
        return [torch.cat([torch.zeros_like(residual), residual]) for residual in conditional]
