"""Storage and compute dtypes: `--dtype auto`, weights cast on use, bf16 images close to fp32."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sd import generate, kernels, load_models, precision
from sd.errors import SDError
from sd.models.layers import Conv2d, GroupNorm, LayerNorm, Linear, cast_to, packing_pays

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.mark.parametrize("native_bf16", [False, True])
def test_auto_picks_fp16_on_cuda_bf16_on_a_bf16_cpu_else_fp32(monkeypatch, native_bf16):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: native_bf16)
    assert precision.weights_dtype("auto", CPU) == (torch.bfloat16 if native_bf16 else torch.float32)
    assert precision.weights_dtype(None, CUDA) == torch.float16
    assert precision.weights_dtype("auto", MPS) == torch.float32
    assert precision.weights_dtype("bf16", CPU) == torch.bfloat16
    with pytest.raises(SDError, match="unknown dtype 'fp8': use one of auto, fp32, bf16, fp16"):
        precision.weights_dtype("fp8", CPU)


def test_compute_dtype_avoids_slow_and_overflowing_arithmetic(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert precision.compute_dtype(torch.bfloat16, CPU) == torch.float32  # bf16 emulated: ~10x slower
    assert precision.compute_dtype(torch.float16, CPU) == torch.float32
    assert precision.compute_dtype(torch.float16, CUDA) == torch.float16
    assert precision.vae_dtype(torch.float16, CUDA) == torch.float32  # fp16 overflows in the VAE decoder
    assert precision.vae_dtype(torch.bfloat16, CUDA) == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.compute_dtype(torch.bfloat16, CPU) == torch.bfloat16


def test_the_real_cpu_check_answers():
    assert isinstance(precision.cpu_has_bf16(), bool)


def chosen_layout(dtype: torch.dtype) -> torch.memory_format:
    return torch.channels_last if kernels.choice("channels_last", CPU, dtype) == "on" else torch.contiguous_format


LAYERS = [
    (lambda: Linear(16, 8), lambda layer, x: F.linear(x, layer.weight.float(), layer.bias.float()), (3, 16)),
    # kernels are cast channels_last where that is faster (sd/kernels.py), and oneDNN sums in another order for each
    # layout (on an AVX2 EPYC the two differ in the last bit), so the reference takes the chosen layout too
    (lambda: Conv2d(4, 8, 3, padding=1),
     lambda layer, x: F.conv2d(x, layer.weight.float().contiguous(memory_format=chosen_layout(torch.float32)), layer.bias.float(), padding=1),
     (2, 4, 5, 5)),
    (lambda: GroupNorm(2, 8), lambda layer, x: F.group_norm(x, 2, layer.weight.float(), layer.bias.float(), layer.eps), (2, 8, 3, 3)),
    (lambda: LayerNorm(16), lambda layer, x: F.layer_norm(x, (16,), layer.weight.float(), layer.bias.float(), layer.eps), (3, 16)),
]


@pytest.mark.parametrize("make, reference, shape", LAYERS)
def test_layers_with_bf16_weights_compute_in_their_input_dtype(make, reference, shape):
    torch.manual_seed(0)
    layer = make().requires_grad_(False)
    for parameter in layer.parameters():
        parameter.normal_()
    layer = layer.to(torch.bfloat16)
    x = torch.randn(shape)
    out = layer(x)
    assert out.dtype == torch.float32
    # exactly the fp32 computation on the bf16-rounded weights
    assert torch.equal(out, reference(layer, x))
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_cast_keeps_memory_layout_and_skips_matching_dtypes():
    kernel = torch.randn(8, 4, 3, 3).bfloat16().contiguous(memory_format=torch.channels_last)
    bias = torch.randn(8).bfloat16()
    cast_kernel, cast_bias = cast_to(torch.float32, kernel, bias)
    assert cast_kernel.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cast_kernel, kernel.float()) and torch.equal(cast_bias, bias.float())
    same, none = cast_to(torch.bfloat16, kernel, None)
    assert same is kernel and none is None


def test_convolution_kernels_load_in_the_chosen_layout(models):
    """The U-Net's and the decoder's, channels_last where that is faster (sd/kernels.py); the image encoder keeps
    the checkpoint's tensors and casts its kernels on use (tests/test_cpu_paths.py)."""
    loaded = [p for name in ("diffusion", "decoder") for p in models[name].parameters() if p.dim() == 4]
    assert len(loaded) > 100
    # packed ones (sd/kernels.py) have oneDNN's own layout
    assert all(kernel.is_mkldnn or kernel.is_contiguous(memory_format=chosen_layout(torch.float32)) for kernel in loaded)


def test_bf16_weights_give_nearly_the_fp32_image(models, safetensors_checkpoint):
    """bf16 keeps 8 bits of mantissa, so each weight moves by up to 0.4 %. On this random checkpoint the
    image then differs from fp32 by about 49 dB PSNR where bf16 weights compute in fp32 (a CPU without
    bf16 instructions), and by about 35 dB where every activation is bf16 too, whether the attention runs
    in pieces (sd/models/attention.py) or in PyTorch's fused kernel; a wrong cast or layout would be near 10 dB."""
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    settings = dict(prompt="a cat", sampler="ddim", steps=3, width=64, height=64, latents=latents, progress=False)
    full = np.asarray(generate(**settings, models=models)[0], dtype=np.float64)
    half_models = load_models(safetensors_checkpoint, dtype=torch.bfloat16)
    # where bf16 computes natively the U-Net's and decoder's kernels are packed (tests/test_cpu_paths.py)
    packed = [p for name in ("diffusion", "decoder") for p in half_models[name].parameters() if p.is_mkldnn]
    assert len(packed) > 100 if packing_pays(CPU, torch.bfloat16) else not packed
    half = np.asarray(generate(**settings, models=half_models)[0], dtype=np.float64)
    del half_models, packed
    psnr = 10 * math.log10(255**2 / ((full - half) ** 2).mean())
    native = precision.compute_dtype(torch.bfloat16, CPU) == torch.bfloat16
    assert psnr > (30 if native else 40), psnr
