"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional
Neural Networks", 2015): each 4x4 block of outputs is made from a 6x6 block of inputs by 36 products per channel pair
instead of 144. The 36 products of all blocks are 36 matrix products over the channels, and the inputs' and kernels'
transforms (sums with small integer and fractional weights) cost a few passes over memory.

It pays where the convolution is bound by arithmetic and the matrix products are large: fp32 with AVX2, where
oneDNN's 3x3 kernels run at the vector units' peak. Capped at AVX2, a Zen 5's guided 320-channel 64x64 convolution
took 28 ms instead of 58, a 640-channel 32x32 one 31 instead of 58, the decoder's 512-channel 128x128 one 144 instead
of 304, its 128-channel 512x512 one 309 instead of 345; few blocks lose (1280 channels at 8x8: 2.2x). With AVX-512 the
same Zen 5 ran it in 0.87-1.86x the time of oneDNN's kernels packed at load (MKL's fp32 products run AVX2 code on AMD
CPUs; on Intel ones they run AVX-512 as oneDNN's kernels do, so there it may pay). It is the same sum in another
order through terms up to 10 times larger: fp32 results within 3-5e-5 of fp64 where oneDNN's are within 1-2e-5
(unit-variance inputs, kernels of unit-variance outputs). bf16 would lose 2-3 bits more: never used there.
sd/kernels.py decides per CPU whether it runs at all (`convolution=winograd`).
"""

import functools

import torch
import torch.nn.functional as F

TILE = 4  # outputs per block side; each block reads TILE + 2 inputs per side
# B^T (inputs), G (kernels) and A^T (outputs) of F(4x4, 3x3), interpolating at 0, 1, -1, 2, -2 and infinity
INPUT_TRANSFORM = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
                   (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
KERNEL_TRANSFORM = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
                    (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
OUTPUT_TRANSFORM = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))
# where it pays: at least this many blocks (a guided 16x16 input has 32) and channels in and out, and kernels of at
# most this many channel pairs (the U-Net's widest at its second level, 1920 to 640: its transform takes 177 MB; the
# third level's would take 236-472 MB, for 0.86x oneDNN's time capped at AVX2)
LEAST_BLOCKS = 32
LEAST_CHANNELS = 128
MOST_CHANNEL_PAIRS = 1920 * 640
CHUNK = 1 << 23  # elements of each temporary of the blocks' transforms: 32 MiB of fp32


@functools.cache
def transform(rows: tuple, device: torch.device) -> torch.Tensor:
    """A block transform of both sides at once, as one matrix: kron(M, M), fp32."""
    matrix = torch.tensor(rows, dtype=torch.float64)
    return torch.kron(matrix, matrix).float().to(device)


def takes(conv: torch.nn.Conv2d) -> bool:
    """Whether `conv` is a layer this computes where it can pay: a 3x3 kernel of stride 1 and padding 1, at least
    LEAST_CHANNELS in and out, at most MOST_CHANNEL_PAIRS (pack_weights leaves such kernels plain where it runs)."""
    if (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups) != ((3, 3), (1, 1), (1, 1), (1, 1), 1):
        return False
    channels = conv.in_channels, conv.out_channels
    return min(channels) >= LEAST_CHANNELS and channels[0] * channels[1] <= MOST_CHANNEL_PAIRS


def suits(conv: torch.nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv` of x is a convolution this computes where it pays (see above and takes): fp32, enough blocks,
    and one that autograd does not record (training): the products are written into buffers. Asked on every
    convolution's call: the dtype and the layer first."""
    if x.dtype != torch.float32 or not takes(conv):
        return False
    batch, _, height, width = x.shape
    blocks = batch * -(-height // TILE) * -(-width // TILE)
    recorded = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, conv.weight, conv.bias))
    return blocks >= LEAST_BLOCKS and not recorded


def transformed_kernel(weight: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) fp32 kernels -> (36, C_in, C_out), each of the 36 a term of G w G^T for every channel pair,
    written into `buffer` (at least 4 times the kernels' size: a fresh tensor's page faults took most of the time)."""
    out_channels, in_channels = weight.shape[:2]
    terms = transform(KERNEL_TRANSFORM, weight.device)
    if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        # (C_out, 3, 3, C_in) in memory: (36, 9) @ (C_out, 9, C_in) -> (C_out, 36, C_in), read as (36, C_in, C_out)
        taps = weight.permute(0, 2, 3, 1).reshape(out_channels, 9, in_channels)
        out = buffer[: 36 * weight[:, :, 0, 0].numel()].view(out_channels, 36, in_channels)
        return torch.matmul(terms, taps, out=out).permute(1, 2, 0)
    # (36, 9) @ (9, C_out * C_in) -> (36, C_out, C_in), read as (36, C_in, C_out)
    out = buffer[: 36 * weight[:, :, 0, 0].numel()].view(36, -1)
    return torch.mm(terms, weight.reshape(-1, 9).T, out=out).view(36, out_channels, in_channels).transpose(1, 2)


def winograd_convolution(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buffer,
                         into: torch.Tensor | None = None, add: bool = False) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) of fp32 x and weights by F(4x4, 3x3) (see suits), channels_last; written
    into `into` where that is a channels_last tensor of the output's shape, a whole number of blocks high and wide
    (else a new tensor), and with `add` added to what `into` holds (its contents are lost either way).
    `buffer(use, elements)` is a flat fp32 tensor of at least that many elements kept for `use` (layers.scratch_buffer):
    the blocks are transformed a few rows at a time through two such temporaries of at most CHUNK elements, and the
    kernels once (a fresh 144 MiB temporary's page faults took longer than its product)."""
    batch, in_channels, height, width = x.shape
    out_channels = weight.shape[0]
    rows, cols = -(-height // TILE), -(-width // TILE)
    shape = (batch, out_channels, rows * TILE, cols * TILE)
    fits = into is not None and (into.shape, into.dtype) == (shape, x.dtype) and into.is_contiguous(memory_format=torch.channels_last)
    out = into if fits else torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    kernel = transformed_kernel(weight, buffer("winograd kernel", 4 * weight.numel()))
    # (B, rows * 4, cols * 4, C_out) -> (B, rows, 4, cols, 4, C_out): each block's 4x4 outputs
    out_blocks = out.permute(0, 2, 3, 1).view(batch, rows, TILE, cols, TILE, out_channels)
    step = max(1, CHUNK // (36 * cols * max(in_channels, out_channels)))  # block rows at a time
    size = 36 * min(step, rows) * cols * max(in_channels, out_channels)
    first_buffer, second_buffer = buffer("winograd first", size), buffer("winograd second", size)
    inputs_transform, outputs_transform = transform(INPUT_TRANSFORM, x.device), transform(OUTPUT_TRANSFORM, x.device)
    for image in range(batch):
        for row in range(0, rows, step):
            chunk = input_blocks(x[image], row, min(step, rows - row), cols)  # (r, cols, 6, 6, C_in)
            count = chunk.shape[0] * cols
            gathered = first_buffer[: chunk.numel()].view(chunk.shape).copy_(chunk).view(count, 36, in_channels)
            # (36, 36) @ (n, 36, C_in) -> (n, 36, C_in): B^T d B for each block d and channel
            inputs = torch.matmul(inputs_transform, gathered, out=second_buffer[: gathered.numel()].view(gathered.shape))
            # 36 x (n, C_in) @ (C_in, C_out) -> (36, n, C_out)
            products = torch.bmm(inputs.transpose(0, 1), kernel, out=first_buffer[: 36 * count * out_channels].view(36, count, out_channels))
            # (16, 36) @ (36, n * C_out) -> (4, 4, r, cols, C_out): A^T m A for each block's products m
            outputs = torch.mm(outputs_transform, products.view(36, -1), out=second_buffer[: 16 * count * out_channels].view(16, -1))
            outputs = outputs.view(TILE, TILE, chunk.shape[0], cols, out_channels).permute(2, 0, 3, 1, 4)
            target = out_blocks[image, row : row + step]
            if bias is not None:
                outputs.add_(bias)
            target.add_(outputs) if add and fits else target.copy_(outputs)
    if (rows * TILE, cols * TILE) != (height, width):
        out = out[:, :, :height, :width].contiguous(memory_format=torch.channels_last)
    return out.add_(into) if add and not fits else out


def input_blocks(image: torch.Tensor, row: int, count: int, cols: int) -> torch.Tensor:
    """The 6x6 inputs of `count` rows of blocks from block row `row` of a (C, H, W) image, zero-padded by one pixel
    and to whole blocks: (count, cols, 6, 6, C), a view of a padded copy of those rows alone (a copy of the whole image
    took 270 MB more at the decoder's top level)."""
    channels, height, width = image.shape
    top, bottom = row * TILE - 1, (row + count) * TILE + 1  # the rows the blocks read, in the image's coordinates
    # (C, H, W) -> (rows read, W, C) -> (4 count + 2, 4 cols + 2, C)
    rows = image.permute(1, 2, 0)[max(top, 0) : min(bottom, height)]
    padded = F.pad(rows, (0, 0, 1, 1 + cols * TILE - width, max(-top, 0), max(bottom - height, 0)))
    row_stride, col_stride, _ = padded.stride()
    # each block's inputs, which overlap by 2
    return padded.as_strided((count, cols, 6, 6, channels), (TILE * row_stride, TILE * col_stride, row_stride, col_stride, 1))
