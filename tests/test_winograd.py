"""3x3 convolutions by Winograd's F(4x4, 3x3) (sd/models/winograd.py) against fp64 convolutions, where the layers run
it, and its timing (sd/kernels.py)."""

import pytest
import torch
import torch.nn.functional as F

from sd import kernels
from sd.models import winograd
from sd.models.layers import Conv2d, scratch_buffer
from sd.models.winograd import suits, winograd_convolution


def scratch_buffers():
    """A `buffer(use, size)` for winograd_convolution: this thread's scratch buffers, as the layers give it."""
    return lambda use, size: scratch_buffer(use, size, torch.device("cpu"), torch.float32)


def winograd_on_every_layer(monkeypatch) -> list:
    """Winograd's algorithm let run wherever its path is chosen, on narrow layers and small inputs too (where it does
    not pay: the demo model's, tests' small models); the list that each of its calls adds its input's shape to."""
    calls = []

    def counted(x, *args):
        calls.append(x.shape)
        return winograd_convolution(x, *args)

    monkeypatch.setattr(winograd, "LEAST_CHANNELS", 1)
    monkeypatch.setattr(winograd, "LEAST_BLOCKS", 1)
    monkeypatch.setattr(winograd, "winograd_convolution", counted)
    return calls


def random_convolution(batch: int, in_channels: int, out_channels: int, height: int, width: int, seed: int = 0):
    """An input, a kernel and a bias, each of unit-variance outputs."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, height, width, generator=generator)
    kernel = torch.randn(out_channels, in_channels, 3, 3, generator=generator) / (3 * in_channels**0.5)
    return x, kernel, torch.randn(out_channels, generator=generator)


# Largest error against fp64, of outputs of rms 1.4. Measured here: 1.6e-5 at most (F.conv2d's fp32: 1.9e-6; at 320
# channels and more 3-5e-5 against 1-2e-5): F(4x4, 3x3)'s transforms sum terms up to 10 times larger than its products,
# so its rounding is several times fp32's. A wrong tap, block or transform term is of order 0.1 to 1.
BOUND = 2e-4


@pytest.mark.parametrize("shape", [(1, 40, 48, 13, 22), (2, 24, 16, 16, 16), (1, 8, 8, 5, 3)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("with_bias", [True, False])
def test_winograd_convolution_is_the_convolution(shape, layout, with_bias, monkeypatch):
    """Sizes that are and are not whole 4x4 blocks, a batch, inputs and kernels in either layout; CHUNK small enough
    that the blocks are transformed in several pieces, the last one short."""
    monkeypatch.setattr(winograd, "CHUNK", 36 * 40 * 48 * 2)  # 2 blocks of the widest layer here
    x, kernel, bias = random_convolution(*shape)
    bias = bias if with_bias else None
    expected = F.conv2d(x.double(), kernel.double(), None if bias is None else bias.double(), padding=1)
    x, kernel = x.contiguous(memory_format=layout), kernel.contiguous(memory_format=layout)
    out = winograd_convolution(x, kernel, bias, scratch_buffers())
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (out.double() - expected).abs().max().item() < BOUND


def test_winograd_reuses_its_buffers_and_leaves_its_inputs_alone():
    x, kernel, bias = random_convolution(2, 32, 32, 12, 12)
    originals = x.clone(), kernel.clone(), bias.clone()
    buffer = scratch_buffers()
    first = winograd_convolution(x, kernel, bias, buffer)
    kept = buffer("winograd first", 1).data_ptr()
    assert torch.equal(winograd_convolution(x, kernel, bias, buffer), first)  # the buffers' old contents do not count
    assert buffer("winograd first", 1).data_ptr() == kept
    assert all(torch.equal(now, then) for now, then in zip((x, kernel, bias), originals))


@torch.no_grad()
def test_winograd_suits_fp32_3x3_convolutions_of_stride_1_on_large_enough_inputs():
    conv = Conv2d(320, 320, 3, padding=1, device="meta")
    large = torch.empty(2, 320, 16, 16, device="meta")  # 32 blocks: the fewest
    assert suits(conv, large) and suits(Conv2d(1920, 640, 3, padding=1, device="meta"), torch.empty(2, 1920, 16, 16, device="meta"))
    assert not suits(conv, torch.empty(1, 320, 16, 16, device="meta"))
    assert not suits(conv, large.to(torch.bfloat16))
    for other in (Conv2d(320, 320, 3, stride=2, padding=1), Conv2d(320, 320, 1), Conv2d(320, 320, 3),
                  Conv2d(320, 64, 3, padding=1), Conv2d(320, 320, 3, padding=1, groups=2), Conv2d(1280, 1280, 3, padding=1)):
        assert not suits(other.to("meta"), large)


def test_a_convolution_that_autograd_records_is_left_to_oneDNN(monkeypatch):
    """Training: Winograd's products are written into buffers, which autograd cannot follow."""
    monkeypatch.setenv("SD_KERNELS", "convolution=winograd")
    conv = Conv2d(128, 128, 3, padding=1)
    x = torch.randn(2, 128, 16, 16)
    conv(x).sum().backward()  # weights that take gradients
    assert conv.weight.grad is not None and not suits(conv, x)
    assert not suits(conv.requires_grad_(False), x.requires_grad_())
    with torch.no_grad():
        assert suits(conv, x)


def test_a_layer_packed_per_size_keeps_its_kernel_plain_where_winograd_runs(monkeypatch):
    """Packed for the small input's shape, and plain again for the large one, whose sums are Winograd's."""
    if not kernels.X86_ONEDNN:
        pytest.skip("packing is for oneDNN on x86")
    monkeypatch.setenv("SD_KERNELS", "convolution=winograd")
    x, kernel, bias = random_convolution(2, 256, 256, 16, 16)
    conv = Conv2d(256, 256, 3, padding=1)
    conv.weight, conv.bias = (torch.nn.Parameter(t, requires_grad=False) for t in (kernel.contiguous(memory_format=torch.channels_last), bias))
    conv.packs_per_size = True
    small = x[:1, :, :8, :8].contiguous(memory_format=torch.channels_last)
    large = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(2):
            out = conv(large)
            assert not conv.weight.is_mkldnn and conv.weight.is_contiguous(memory_format=torch.channels_last)
            assert (out.double() - F.conv2d(x.double(), kernel.double(), bias.double(), padding=1)).abs().max() < BOUND
            assert torch.allclose(conv(small), F.conv2d(small, kernel, bias, padding=1), atol=1e-5)
            assert conv.weight.is_mkldnn and conv.weight.packed_for == tuple(small.shape)


@pytest.mark.parametrize("packing", ["off", "on", "sizes"])
def test_the_timing_s_paths_compute_the_same_convolutions(packing, monkeypatch):
    """Timed against the packing chosen (here forced), Winograd's algorithm and oneDNN's give the same outputs."""
    if packing != "off" and not kernels.X86_ONEDNN:
        pytest.skip("packing is for oneDNN on x86")
    monkeypatch.setenv("SD_KERNELS", f"packing={packing}")
    calls = kernels.convolution_calls(torch.float32)
    assert set(calls) == set(kernels.CHOICES["convolution"]) and len(calls["direct"]) == len(kernels.WINOGRAD_CONVOLUTIONS)
    for direct, by_winograd in zip(calls["direct"], calls["winograd"]):
        expected, out = direct(), by_winograd()
        assert out.shape == expected.shape
        assert (out - expected).abs().max() < 1e-4 * expected.abs().max()  # measured: 5.8e-6 to 7.4e-6


@pytest.mark.parametrize("height, width", [(16, 12), (13, 12)])
@pytest.mark.parametrize("add", [False, True])
def test_winograd_writes_into_a_given_tensor_and_adds_to_it(height, width, add):
    """Into `into` where it is a whole number of blocks (16x12), else into a new tensor (13x12); with `add`, the sum of
    what `into` held and the convolution either way."""
    x, kernel, bias = random_convolution(2, 24, 16, height, width)
    total = torch.randn(2, 16, height, width).contiguous(memory_format=torch.channels_last)
    expected = F.conv2d(x.double(), kernel.double(), bias.double(), padding=1) + (total.double() if add else 0)
    into = total.clone()
    out = winograd_convolution(x.contiguous(memory_format=torch.channels_last), kernel, bias, scratch_buffers(), into, add)
    assert (out is into) == (height % 4 == 0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (out.double() - expected).abs().max().item() < BOUND
