"""The VAE decoder's upsampling without the upsampled image, and the memory a finished stage gives back."""

import pytest
import torch
import torch.nn.functional as F

from sd.models.layers import Upsample
from sd.models.layers import _scratch, cast_to, release_scratch
from sd.memory import release_memory


@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_equals_a_convolution_of_the_nearest_upsampled_image(channels_last, weights_dtype):
    torch.manual_seed(0)
    upsample = Upsample(16).eval().to(weights_dtype)
    # odd and unequal sides reach every border case of the four folded kernels
    x = torch.randn(2, 16, 7, 10)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = upsample.conv.weight.float(), upsample.conv.bias.float()
    with torch.inference_mode():
        expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
        actual = upsample(x)
    assert actual.shape == (2, 16, 14, 20) and actual.dtype == torch.float32
    assert actual.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # the same products summed in another order: fp32 rounding apart (outputs are of order 1)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_a_finished_stage_frees_the_weight_cast_buffer():
    cast_to(torch.float32, torch.zeros(1000, dtype=torch.bfloat16))
    assert _scratch.buffers[("cast", torch.device("cpu"), torch.float32)].numel() >= 1000
    release_memory()
    assert not getattr(_scratch, "buffers", {})
    release_scratch()  # nothing left to free is fine too


def test_cast_buffer_made_under_inference_mode_serves_outside_it():
    release_scratch()
    weight = torch.randn(8, 4, dtype=torch.bfloat16)
    with torch.inference_mode():
        cast_to(torch.float32, weight)
    with torch.no_grad():
        (cast,) = cast_to(torch.float32, weight)
    assert torch.equal(cast, weight.float())
