"""Tiled VAE decoding and encoding (sd/models/tiling.py) against diffusers' AutoencoderKL.enable_tiling().

Both sides run the same weights: the random full-size SD 1.5 checkpoint with small tiles (8 latents, 64
pixels, so that 3x3 tiles and more stay cheap), the shipped demo model's small VAE at the default tile
(64 latents, 512 pixels) and at small ones, and for the bare scheme a cheap stand-in network inside
diffusers' own tiled_decode and _tiled_encode. Run this module under the shared lock (it loads the full-size
checkpoint): flock /tmp/sd-heavy.lock python -m pytest tests/test_tiling.py

Tolerances, and why:
- tiled decode vs diffusers' tiled decode: 1/255 as pixels in [0, 1] (2/255 on the decoder's [-1, 1] scale),
  the issue's bound; and, on the full-size checkpoint, also 1e-4 of the output's largest value as in
  test_parity.py. Each tile is the untiled decoder's computation (fp32, sums ordered otherwise: measured
  about 3e-5) and the blending is the same products in the same order.
- tiled encode's moments vs diffusers' posterior (mean, log-variance): 1e-4 of the reference's largest
  value (test_parity.py's bound): the same per-tile computation, blended as diffusers does.
- the bare scheme with a stand-in network: 1e-6, the cross-fades being the same float operations
  (bit-equal in practice).
- tiled vs untiled decode away from the seams: max 0.2 and mean 0.03 on the [-1, 1] scale, with the
  largest difference inside the blend bands. Away from the bands a tile's pixels are not the untiled ones
  exactly because the decoder's receptive field is the whole tile: its group norms take their statistics
  over the tile, not the image, and its mid-block attention sees only the tile. Measured on the demo model
  at 104x104 latents (3x3 tiles): 0.135 max and 0.017 mean away from the bands, 0.56 max within them. A
  misplaced or unblended tile differs by order 1.

Bounded memory: a tiled run holds the output, one tile's pass through the network (the memory of an
untiled 512x512 decode at the default tile, whatever the image's size), that tile's output, and the bands
kept of its neighbours (the last 128 pixel rows of each tile of the row above and the last 128 columns of
the tile to its left: 3 x 128 x 2048 values for a row of 2048 pixels). So a 2048x2048 decode needs the
memory of a 1024x1024 one plus the larger output (48 MiB in fp32). The tests check the two conditions of
that argument: the network never runs on more than one tile, and a tile's output is gone before the next
tile runs.
"""

import json
import weakref

import pytest
import torch
import torch.nn.functional as F
from reference import _build_on_meta, read_original
from safetensors import safe_open
from torch import nn

from sd import SDError
from sd.pipeline import DEMO_CHECKPOINT
from sd.models.tiling import run_tiled

PIXEL_TOLERANCE = 2 / 255  # 1/255 in [0, 1] is 2/255 in [-1, 1]
RELATIVE_TOLERANCE = 1e-4
SMALL_TILE = 16  # latents


def set_tile(vae, tile: int) -> None:
    """diffusers' tiling on, with tiles of `tile` latents (8 * tile pixels)."""
    vae.enable_tiling()
    vae.tile_latent_min_size = tile
    vae.tile_sample_min_size = 8 * tile


def assert_relatively_close(ours: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    assert ours.shape == reference.shape
    scale = reference.abs().max().item()
    error = (ours - reference).abs().max().item()
    print(f"{what}: max abs diff {error:.3g}, reference max abs {scale:.3g}")
    assert error <= RELATIVE_TOLERANCE * scale, f"{what}: {error} > {RELATIVE_TOLERANCE} * {scale}"


def assert_same_pixels(ours: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    assert ours.shape == reference.shape
    error = (ours.clamp(-1, 1) - reference.clamp(-1, 1)).abs().max().item()
    print(f"{what}: max pixel diff {error * 255 / 2:.3g} / 255")
    assert error <= PIXEL_TOLERANCE, f"{what}: {error * 255 / 2} / 255"


def latents(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def image(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def compare_decode(ours, vae, z: torch.Tensor, tile: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ours and diffusers' tiled decode of `z`, checked to be the same pixels."""
    set_tile(vae, tile)
    with torch.inference_mode():
        expected = vae.decode(z / vae.config.scaling_factor).sample
        actual = ours(z, tiled=True, tile_size=tile)
    assert_same_pixels(actual, expected, what)
    return actual, expected


def compare_encode(ours, vae, x: torch.Tensor, tile: int, what: str) -> None:
    set_tile(vae, tile)
    noise = latents(x.shape[0], 4, x.shape[2] // 8, x.shape[3] // 8, seed=5)
    with torch.inference_mode():
        posterior = vae.encode(x).latent_dist
        mean, log_variance = ours.moments(x, tiled=True, tile_size=tile)
        sampled = ours(x, noise, tiled=True, tile_size=tile)
    assert_relatively_close(mean, posterior.mean, f"{what} mean")
    # diffusers clamps the log-variance when it builds the posterior, we when we sample
    assert_relatively_close(log_variance.clamp(-30, 20), posterior.logvar, f"{what} log-variance")
    expected = (posterior.mean + posterior.std * noise) * vae.config.scaling_factor
    assert_relatively_close(sampled, expected, f"{what} sampled latents")


# The demo model's small VAE: the default tile at a cheap price


@pytest.fixture(scope="module")
def demo_vae():
    """diffusers' AutoencoderKL of the demo model's sizes, from its weights."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with safe_open(str(DEMO_CHECKPOINT), framework="pt") as file:
        sizes = json.loads(file.metadata()["sd_config"])["vae"]
    widths = tuple(sizes["base_width"] * m for m in sizes["width_multipliers"])
    config = dict(
        down_block_types=("DownEncoderBlock2D",) * len(widths), up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths, layers_per_block=sizes["blocks_per_level"], latent_channels=sizes["latent_channels"],
        norm_num_groups=sizes["num_groups"], sample_size=512, scaling_factor=sizes["scale_factor"],
    )
    weights = {key: value.float() for key, value in read_original(DEMO_CHECKPOINT, "first_stage_model.").items()}
    return _build_on_meta(AutoencoderKL, config, convert_ldm_vae_checkpoint(weights, config))


@pytest.fixture(scope="module")
def default_tiles(demo):
    """Latents of 104x104 (832x832 pixels: 3x3 tiles of 64 latents) and our tiled decode of them."""
    z = latents(1, 4, 104, 104)
    with torch.inference_mode():
        return z, demo["decoder"](z, tiled=True)


def test_tiled_decode_matches_diffusers_at_the_default_tile(default_tiles, demo_vae):
    z, decoded = default_tiles
    demo_vae.enable_tiling()
    assert (demo_vae.tile_latent_min_size, demo_vae.tile_sample_min_size) == (64, 512)
    with torch.inference_mode():
        expected = demo_vae.decode(z / demo_vae.config.scaling_factor).sample
    assert_same_pixels(decoded, expected, "demo decode 104x104, default tile")


@pytest.mark.parametrize("shape, tile", [
    ((2, 4, 20, 35), 8),  # a batch, not square; 20 and 35 are no multiples of the stride (6)
    ((1, 4, 38, 28), SMALL_TILE),  # last tiles of 2 and 4 latents: a blend band capped by the smaller tile
])
def test_tiled_decode_matches_diffusers_on_the_demo_model(demo, demo_vae, shape, tile):
    compare_decode(demo["decoder"], demo_vae, latents(*shape), tile, f"demo decode {shape}, tile {tile}")


@pytest.mark.parametrize("shape, tile", [
    ((1, 3, 832, 832), 64),
    ((2, 3, 304, 224), SMALL_TILE),  # a batch, not square, last tiles of 16 and 32 pixels
])
def test_tiled_encode_matches_diffusers_on_the_demo_model(demo, demo_vae, shape, tile):
    compare_encode(demo["encoder"], demo_vae, image(*shape), tile, f"demo encode {shape}, tile {tile}")


def seam_distance(size: int, crop: int, blend: int) -> torch.Tensor:
    """Each pixel's distance along one side to the nearest blend band [k * crop, k * crop + blend), k >= 1."""
    position = torch.arange(size)
    starts = torch.arange(crop, size, crop)
    before = (starts[None, :] - position[:, None]).clamp(min=0)
    after = (position[:, None] - (starts[None, :] + blend - 1)).clamp(min=0)
    return (before + after).amin(dim=1)


def test_tiled_and_untiled_decode_differ_only_near_the_seams(demo, default_tiles):
    z, tiled = default_tiles
    with torch.inference_mode():
        difference = (tiled - demo["decoder"](z)).abs().amax(dim=(0, 1))  # (H, W)
    rows, columns = (seam_distance(size, crop=384, blend=128) for size in difference.shape)
    distance = torch.minimum(rows[:, None], columns[None, :])
    away, near = difference[distance >= 8], difference[distance == 0]
    print(f"away from the bands: max {away.max():.3g}, mean {away.mean():.3g}; within them: max {near.max():.3g}")
    assert away.max() <= 0.2 and away.mean() <= 0.03
    assert near.max() > away.max()


def test_tiled_within_one_tile_is_the_untiled_path(demo):
    z, x = latents(1, 4, 16, 12), image(1, 3, 128, 96)
    noise = latents(1, 4, 16, 12, seed=2)
    with torch.inference_mode():
        assert torch.equal(demo["decoder"](z, tiled=True, tile_size=16), demo["decoder"](z))
        assert torch.equal(demo["encoder"](x, noise, tiled=True, tile_size=16), demo["encoder"](x, noise))


@pytest.mark.parametrize("tile_size", [0, 6, -4])
def test_tile_size_is_a_positive_multiple_of_4(demo, tile_size):
    with pytest.raises(SDError, match="multiple of 4"):
        demo["decoder"](latents(1, 4, 40, 40), tiled=True, tile_size=tile_size)


# Bounded memory: the network sees one tile at a time and no tile outlives its turn


def spy_on_inputs(monkeypatch, model: nn.Module, method: str) -> list[torch.Size]:
    """The (H, W) of every input that `model.method` (the whole network) is called with from now on."""
    sides, network = [], getattr(model, method)

    def recorded(x):
        sides.append(x.shape[-2:])
        return network(x)

    monkeypatch.setattr(model, method, recorded)
    return sides


def test_the_networks_never_run_on_more_than_one_tile(demo, monkeypatch):
    decoder, encoder = demo["decoder"], demo["encoder"]
    decoded = spy_on_inputs(monkeypatch, decoder, "decode")
    encoded = spy_on_inputs(monkeypatch, encoder, "stacked_moments")
    with torch.inference_mode():
        decoder(latents(1, 4, 20, 35), tiled=True, tile_size=8)
        encoder(image(1, 3, 160, 280), latents(1, 4, 20, 35), tiled=True, tile_size=8)
    # 4 rows x 6 columns of tiles 6 latents (48 pixels) apart
    assert len(decoded) == 4 * 6 and max(max(side) for side in decoded) == 8
    assert len(encoded) == 4 * 6 and max(max(side) for side in encoded) == 8 * 8


def test_each_tile_is_dropped_before_the_next_one_runs():
    outputs = []

    def network(x):
        assert all(output() is None for output in outputs), "a tile's output is still held"
        # (B, 4, t, t) -> (B, 3, 8t, 8t), differing per tile so that the blending has work to do
        out = F.interpolate(x[:, :3], scale_factor=8) + x.mean()
        outputs.append(weakref.ref(out))
        return out

    run_tiled(network, latents(2, 4, 30, 41), tile=8, scale=8)
    assert len(outputs) == 5 * 7


# The bare scheme inside diffusers' own tiled_decode and _tiled_encode, over many sizes


class StandIn(nn.Module):
    """A cheap network whose tiles differ: resized by `scale`, plus the tile's mean."""

    def __init__(self, channels: int, scale: float):
        super().__init__()
        self.channels, self.scale = channels, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        resized = F.interpolate(x, scale_factor=self.scale, mode="nearest-exact") if self.scale > 1 else F.avg_pool2d(x, round(1 / self.scale))
        return resized.repeat(1, 3, 1, 1)[:, : self.channels] * 2 + x.mean((1, 2, 3), keepdim=True)


@pytest.fixture(scope="module")
def stand_in_vae():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=32).eval()
    vae.decoder, vae.post_quant_conv = StandIn(3, 8), nn.Identity()
    vae.encoder, vae.quant_conv = StandIn(8, 1 / 8), nn.Identity()
    return vae


@pytest.mark.parametrize("height, width", [(9, 9), (12, 25), (16, 13), (30, 41), (49, 8), (2, 70)])
@pytest.mark.parametrize("tile", [4, 8])
def test_the_scheme_matches_diffusers_at_any_size(stand_in_vae, height, width, tile):
    z, x = latents(2, 4, height, width), image(2, 3, 8 * height, 8 * width)
    set_tile(stand_in_vae, tile)
    with torch.inference_mode():
        expected_decoded = stand_in_vae.tiled_decode(z).sample
        expected_moments = stand_in_vae._tiled_encode(x)
    decoded = run_tiled(stand_in_vae.decoder, z, tile, scale=8)
    moments = run_tiled(stand_in_vae.encoder, x, 8 * tile, scale=1 / 8)
    torch.testing.assert_close(decoded, expected_decoded, rtol=0, atol=1e-6)
    torch.testing.assert_close(moments, expected_moments, rtol=0, atol=1e-6)


# The full-size SD 1.5 VAE (random weights), with tiles of 8 latents (64 pixels): at 16 these two tests took
# 3.5 minutes on a busy 2-core machine


def test_tiled_decode_matches_diffusers_full_size(models, vae):
    # 3x4 tiles of 8 latents, 6 apart, the last ones 2 and 3 latents wide
    actual, expected = compare_decode(models["decoder"], vae, latents(1, 4, 14, 21), 8, "full-size decode")
    assert_relatively_close(actual, expected, "full-size decode")


def test_tiled_encode_matches_diffusers_full_size(models, vae):
    # 3x3 tiles of 64 pixels, 48 apart, the last ones 16 and 24 pixels wide
    compare_encode(models["encoder"], vae, image(1, 3, 112, 120), 8, "full-size encode")
