"""Tiled VAE decoding and encoding: diffusers' scheme (AutoencoderKL.enable_tiling), streamed.

The input is cut into square tiles of `tile` (64 latents, 512 pixels, by default) whose origins are a
`stride` of three quarters of a tile apart, so neighbours overlap by a quarter; tiles at the right and
bottom edges are cut short by the input. Each tile goes through the network alone. Its output is then
cross-faded, linearly over a band of a quarter of an output tile (or of the smaller of the two tiles),
first with the tile above it, then with the tile to its left, each as already blended itself (diffusers
blends in place); what is left of each blended tile after cropping it to the stride is placed in the
output, where the crops fit edge to edge.

Unlike diffusers, which keeps every tile's output until the end, each tile is written out and dropped as
soon as it is blended: a later tile only needs the last band of rows of the tile above it and the last band
of columns of the tile to its left, which are kept. So the memory beyond the output itself is that of one
tile through the network, whatever the size of the image.
"""

from collections.abc import Callable

import torch

from ..errors import SDError
from .layers import trim_heap

# the share of a tile that overlaps the next one (diffusers' tile_overlap_factor)
OVERLAP = 0.25


def run_tiled(network: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, scale: float) -> torch.Tensor:
    """`network(x)` computed tile by tile, for a network whose output is `scale` times the size of its
    input (8 for the decoder, 1/8 for the encoder); `tile` is the side of an input tile. An input no larger
    than one tile goes through the network whole, as diffusers does."""
    height, width = x.shape[-2:]
    if max(height, width) <= tile:
        return network(x)
    stride = int(tile * (1 - OVERLAP))
    out_tile = round(tile * scale)
    blend = int(out_tile * OVERLAP)
    # each tile keeps out_tile - blend of its output: the stride, in output units
    crop = out_tile - blend
    out = None
    above: dict[int, torch.Tensor] = {}  # column -> last rows of that column's tile in the row above
    for row, top in enumerate(range(0, height, stride)):
        left_edge = None  # last columns of the tile to the left
        for column, left in enumerate(range(0, width, stride)):
            # (B, C, t, t) -> (B, C', t * scale, t * scale), t or less at the edges
            piece = network(x[..., top : top + tile, left : left + tile])
            blend_with_neighbours(piece, above.get(column) if row else None, left_edge, blend)
            above[column], left_edge = piece[..., -blend:, :].clone(), piece[..., -blend:].clone()
            if out is None:
                # (B, C, H, W) -> (B, C', H * scale, W * scale)
                out = piece.new_empty(*piece.shape[:2], round(height * scale), round(width * scale))
            out[..., row * crop : (row + 1) * crop, column * crop : (column + 1) * crop] = piece[..., :crop, :crop]
            del piece
            if out.device.type == "cpu":
                trim_heap()  # the next tile's network run then reuses this one's pages
    return out


def blend_with_neighbours(piece: torch.Tensor, above: torch.Tensor | None, left: torch.Tensor | None, blend: int) -> None:
    """Cross-fades a tile's output in place with the kept bands of the (already blended) tiles above it and
    to its left, in diffusers' order: the one above first."""
    if above is not None:
        cross_fade(above, piece, blend, dim=2)
    if left is not None:
        cross_fade(left, piece, blend, dim=3)


def cross_fade(previous: torch.Tensor, piece: torch.Tensor, blend: int, dim: int) -> None:
    """Blends, in place, the first rows (dim 2) or columns (dim 3) of `piece` with the last ones of
    `previous`, the tile before it along `dim` (or its kept band), over the smaller of `blend` and the two
    tiles' sizes: the weight of `piece` rises from 0 by 1 / extent a row or column."""
    extent = min(previous.shape[dim], piece.shape[dim], blend)
    # weights computed in float64 and rounded once, as diffusers' Python floats are (on the CPU: MPS has no float64)
    ramp = torch.arange(extent, dtype=torch.float64) / extent
    shape = (extent, 1) if dim == 2 else (extent,)
    weight = ramp.to(piece.dtype).to(piece.device).view(shape)
    complement = (1 - ramp).to(piece.dtype).to(piece.device).view(shape)
    band = piece.narrow(dim, 0, extent)
    band.copy_(previous.narrow(dim, previous.shape[dim] - extent, extent) * complement + band * weight)


def check_tile_size(tile_size: int) -> None:
    """Tiles must overlap by a whole quarter, so that their crops fit edge to edge at either scale."""
    if tile_size <= 0 or tile_size % 4:
        raise SDError(f"the VAE tile size must be a positive multiple of 4 latents, not {tile_size}")
