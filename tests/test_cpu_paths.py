"""The CPU-only paths (which of them runs is chosen per CPU: sd/kernels.py, tests/test_kernels.py): attention in
cache-sized pieces, linear layers run as 1x1 convolutions, kernels cast channels_last or packed for oneDNN,
encoders whose memory-mapped weights are handed back after each use, and the VAE's blocks sharing their temporaries."""

import platform
import sys
import weakref

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sd.models.attention import PIECE_SCORES, _weighted_values, attend, attend_by_powers_of_two, attend_in_pieces
from sd.models.unet import GEGLU
from sd.models.decoder import Decoder
from sd.models.encoder import Encoder
from sd.models.layers import (
    Conv2d, GroupNorm, Linear, Scratch, Upsample, cast_to, convolution_added, fold_upsampling, linear_as_convolution, pack_convolution_weight,
    pack_weights, scratch_for,
)
from sd.models.vae import VAEConfig
from sd.precision import cpu_has_bf16
from sd.files.loader import release_mapped
from test_winograd import winograd_on_every_layer
from sd.prompts.tokenizer import encode


def qkv(length: int, key_length: int, width: int = 40, dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(0)
    # queries and keys of scale 2 make the softmax peaky, as trained attention often is
    q = torch.randn(2, 8, length, width, generator=generator) * 2
    k = torch.randn(2, 8, key_length, width, generator=generator) * 2
    v = torch.randn(2, 8, key_length, width, generator=generator)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def rms(t: torch.Tensor) -> float:
    return t.float().pow(2).mean().sqrt().item()


# bf16 against fp32 attention: the pieces round their scores to bf16, where PyTorch's fused kernel keeps fp32.
# Measured here (outputs of rms 0.48, 0.66 and 0.50): 0.0072, 0.0053 and 0.0059 rms for the pieces (largest single
# error 0.106; the softmax of every piece, before the powers of 2, gave 0.0062 and 0.0057 for the first two), 0.0008
# to 0.0012 for the fused kernel; the bound, 0.015, is that rounding with room to spare. fp32 (oneDNN's products on
# x86, by_rows) against float64 attention: 7.1e-7, 3.1e-7 and 5.5e-7 rms (the fused kernel 4.0e-7, 3.1e-7, 5.1e-7);
# the bound, 1e-5, is fp32 rounding with room to spare. A softmax scale 10 % off gives 0.04 to 0.06, and a piece
# shifted by one row 0.47.
@pytest.mark.parametrize("dtype, reference_dtype, bound", [(torch.bfloat16, torch.float32, 0.015), (torch.float32, torch.float64, 1e-5)])
@pytest.mark.parametrize("length, key_length, width", [(2100, 2100, 40), (1000, 77, 40), (1500, 1500, 80)])
def test_attention_in_pieces_is_as_close_to_a_wider_dtype_as_the_fused_kernel_and_leaves_its_inputs_alone(
    dtype, reference_dtype, bound, length, key_length, width
):
    """2100 x 2100 scores make three pieces per head, the last one short, 1500 x 1500 two. The 40-wide heads take
    powers of 2 of their scores, the 80-wide ones the softmax. The keys are centred in a copy: in fp32, `k.float()` is
    k itself, which must not be changed in place."""
    assert length * key_length > PIECE_SCORES or key_length == 77
    q, k, v = qkv(length, key_length, width, dtype)
    inputs = [t.clone() for t in (q, k, v)]
    with torch.inference_mode():
        reference = F.scaled_dot_product_attention(q.to(reference_dtype), k.to(reference_dtype), v.to(reference_dtype))
        ours = attend_in_pieces(q, k, v)
        fused = F.scaled_dot_product_attention(q, k, v)
    assert ours.dtype == dtype and ours.shape == reference.shape
    assert rms(ours.to(reference_dtype) - reference) < bound
    assert rms(fused.to(reference_dtype) - reference) < bound
    assert all(torch.equal(before, after) for before, after in zip(inputs, (q, k, v)))


def test_attention_by_powers_of_two_is_the_softmax_s_until_its_powers_overflow():
    """In fp32, where rounding leaves room to see a wrong answer: 4.3e-6 from float64's at most, as PyTorch's fused
    kernel (4.1e-6; keys 10 % larger move it by 0.27). Queries and keys 3x larger make scores up to about 200 (290
    in units of ln 2): powers of 2 past 2^128 overflow, and it says so."""
    q, k, v = qkv(600, 77, dtype=torch.float32)
    with torch.inference_mode():
        ours = attend_by_powers_of_two(q, k, v)
        torch.testing.assert_close(ours.double(), F.scaled_dot_product_attention(q.double(), k.double(), v.double()), rtol=0, atol=1e-5)
        assert attend_by_powers_of_two(q * 3, k * 3, v) is None


def test_bf16_attention_in_pieces_takes_powers_of_two_where_they_are_finite_and_the_softmax_elsewhere():
    q, k, v = qkv(600, 600)
    with torch.inference_mode():
        assert torch.equal(attend_in_pieces(q, k, v), attend_by_powers_of_two(q, k, v))
        q, k = q * 3, k * 3
        assert attend_by_powers_of_two(q, k, v) is None
        ours = attend_in_pieces(q, k, v)
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    # The powers alone would give NaN. Scores up to 200, rounded to bf16 (steps of 1 there), put the softmax 0.028 rms
    # from fp32's (outputs of rms 0.96; the fused kernel, which keeps fp32 scores, 0.001).
    assert ours.isfinite().all() and rms(ours.float() - reference) < 0.05


def test_fp16_attention_in_pieces_takes_the_softmax():
    """fp16's largest power of 2 is 2^15: SD's scores would overflow it often. 0.0008 rms from fp32 (outputs of rms
    0.58; a softmax scale 10 % off gives 0.049)."""
    q, k, v = qkv(300, 300, dtype=torch.float16)
    with torch.inference_mode():
        ours = attend_in_pieces(q, k, v)
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert ours.dtype == torch.float16 and rms(ours.float() - reference) < 0.003


@pytest.mark.parametrize("path", ["sdpa", "pieces"])
def test_attention_runs_the_chosen_path_and_causal_attention_the_fused_kernel(path, monkeypatch):
    monkeypatch.setenv("SD_KERNELS", f"attention={path}")
    q, k, v = qkv(300, 300, dtype=torch.float32)
    expected = F.scaled_dot_product_attention(q, k, v) if path == "sdpa" else attend_in_pieces(q, k, v)
    assert torch.equal(attend(q, k, v), expected)
    q, k, v = qkv(77, 77)
    assert torch.equal(attend(q, k, v, causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_piece_of_scores_is_alive_at_a_time(dtype):
    """Scores kept until the next piece's were made left glibc two blocks taking turns, one of them trimmed and faulted
    in again each time (fp32 on a Zen 5: 21 ms a head against 10, enough to flip the timed choice)."""
    q, k, v = qkv(3 * PIECE_SCORES // 1024 - 7, 1024, dtype=dtype)
    pieces = []

    def weigh(scores):
        assert all(piece() is None for piece in pieces), "a previous piece's scores are still alive"
        pieces.append(weakref.ref(scores))
        return scores.div_(scores.shape[-1])  # in place, as the powers of 2 are

    _weighted_values(q, k, v, weigh)
    assert len(pieces) == 2 * 8 * 3


def test_attention_that_autograd_records_takes_the_fused_kernel_whatever_the_choice(monkeypatch):
    """Attention in training has gradients though pieces are chosen: the pieces divide by sums in place, which
    autograd refuses at the backward pass (test_demo.py's tiny VAE, 1 head 8 wide, failed so on CI's machine).
    Against sdpa's own gradients, the same kernel on the same inputs: equal."""
    monkeypatch.setenv("SD_KERNELS", "attention=pieces")
    inputs = [x.requires_grad_() for x in qkv(64, 64, dtype=torch.float32)]
    attend(*inputs).square().sum().backward()
    gradients = [x.grad for x in inputs]
    for x in inputs:
        x.grad = None
    F.scaled_dot_product_attention(*inputs).square().sum().backward()
    assert all(torch.equal(ours, x.grad) for ours, x in zip(gradients, inputs))


@pytest.mark.parametrize("transposed", [False, True])
def test_linear_as_a_convolution_equals_linear(transposed):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 300, 64, generator=generator)
    if transposed:  # a non-contiguous input of the same shape
        x = torch.randn(2, 64, 300, generator=generator).transpose(1, 2)
    weight, bias = torch.randn(96, 64, generator=generator), torch.randn(96, generator=generator)
    out = linear_as_convolution(x, weight, bias)
    assert out.shape == (2, 300, 96) and out.is_contiguous()
    # the same sums in another order: fp32 rounding apart (values of order 10)
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(linear_as_convolution(x, weight, None), F.linear(x, weight), rtol=1e-5, atol=1e-4)


def test_kernels_are_cast_channels_last_when_asked():
    kernel, bias = torch.randn(8, 4, 3, 3), torch.randn(8)
    cast_kernel, cast_bias = cast_to(torch.float32, kernel, bias, channels_last=True)
    assert cast_kernel.is_contiguous(memory_format=torch.channels_last) and torch.equal(cast_kernel, kernel)
    assert cast_bias is not bias and torch.equal(cast_bias, bias)
    laid_out = kernel.contiguous(memory_format=torch.channels_last)
    assert cast_to(torch.float32, laid_out, bias, channels_last=True)[0] is laid_out
    half = cast_to(torch.bfloat16, kernel, channels_last=True)[0]
    assert half.is_contiguous(memory_format=torch.channels_last) and torch.equal(half, kernel.bfloat16())


X86_ONEDNN = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()


def random_layers(dtype: torch.dtype) -> torch.nn.Sequential:
    """Each kind of convolution our models have (3x3, 1x1, strided, the upsampling one), then the U-Net's
    feed-forward layer and a linear one, over the pixels as tokens."""
    layers = torch.nn.Sequential(
        Conv2d(4, 64, 3, padding=1), Conv2d(64, 32, 1), Conv2d(32, 32, 3, stride=2, padding=1), Upsample(32),
        torch.nn.Flatten(2), Transpose(), GEGLU(32), Linear(32, 24),
    )
    generator = torch.Generator().manual_seed(0)
    for parameter in layers.parameters():
        parameter.data = (torch.randn(parameter.shape, generator=generator) * 0.2).to(dtype)
        parameter.requires_grad_(False)
    for conv in layers.modules():
        if isinstance(conv, Conv2d):
            conv.weight.data = conv.weight.contiguous(memory_format=torch.channels_last)
    return layers


class Transpose(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, L) -> (B, L, C)
        return x.transpose(1, 2)


@pytest.mark.skipif(not X86_ONEDNN, reason="packing is for oneDNN on x86")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_compute_the_same_sums(dtype):
    """Packing changes the weights' layout in memory, not the arithmetic: convolutions and linear layers give
    bit-equal outputs (measured so here in fp32 and bf16), the upsampling layer's too, whose folded kernels are
    packed in place of its 3x3 one. The feed-forward layer, whose first weight is packed in halves, then takes
    the GELU into the gate's product, which rounds once where plain layers round twice: its outputs agree to
    rounding. 1x1 kernels stay plain (see pack_weights). An input of another dtype still works, by unpacking
    (the layers compute in their input's dtype)."""
    if dtype == torch.bfloat16 and not cpu_has_bf16():
        pytest.skip("bf16 weights are packed only on CPUs with bf16 instructions")
    layers = random_layers(dtype)
    convolutions, feed_forward = layers[:4], layers[4:]
    x = torch.randn(2, 4, 19, 21, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain, plain_fp32 = convolutions(x.to(dtype)), convolutions(x)
        plain_tokens = feed_forward(plain)
        pack_weights(layers)
        packed, packed_fp32 = convolutions(x.to(dtype)), convolutions(x)
        packed_tokens = feed_forward(plain)
    packed_layers = [layer.weight.is_mkldnn for layer in layers.modules() if isinstance(layer, (Conv2d, Linear))]
    assert packed_layers == [True, False, True, True, True]
    upsample, feed_forward_layer = layers[3], layers[6]
    assert not hasattr(upsample, "conv") and all(kernel.is_mkldnn for kernel in upsample.packed[0])
    assert not hasattr(feed_forward_layer, "proj_in") and [t.is_mkldnn for t in feed_forward_layer.packed] == [True, False, True, False]
    assert packed.dtype == dtype and packed.shape == (2, 32, 20, 22)
    assert torch.equal(packed, plain)
    # largest error against the largest value. With fp32 input and bf16 weights the upsampling's kernels were
    # folded in bf16 before packing, so each folded tap is rounded to bf16 once (plain weights fold in the
    # input's fp32): measured 1.8e-3, one rounding being 2^-8 = 3.9e-3 of a value. The feed-forward layer:
    # 4.9e-3 in bf16 (each is that far from the fp32 result), 0 in fp32. A wrong kernel, half or bias would be
    # of order 1.
    bound = 2**-7 if dtype == torch.bfloat16 else 1e-6
    if dtype == torch.float32:
        assert torch.equal(packed_fp32, plain_fp32)
    else:
        assert relative_error(packed_fp32, plain_fp32) < bound
    assert packed_tokens.shape == (2, 440, 24)
    assert relative_error(packed_tokens, plain_tokens) < bound


@pytest.mark.skipif(not X86_ONEDNN, reason="packing is for oneDNN on x86")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_packed_per_size_are_packed_for_each_size_they_meet(dtype):
    """With per_size, pack_weights leaves the 3x3 and the folded kernels plain; each is packed at its first call for
    the shape of its input there (batch, height and width), kept while it stays, and packed anew where it changes, or
    where its weight was replaced by one packed for one 8x8 input. The sums are the plain layers', bit for bit for a
    batch of two (measured so here: oneDNN reorders a plain kernel into the layout for its input on each call)."""
    if dtype == torch.bfloat16 and not cpu_has_bf16():
        pytest.skip("bf16 weights are packed only on CPUs with bf16 instructions")
    layers = random_layers(dtype)
    convolutions = layers[:4]  # 3x3 (4 -> 64), 1x1 (64 -> 32), 3x3 strided (32 -> 32), upsampling
    first, strided, upsample = layers[0], layers[2], layers[3]
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(batch, 4, *size, generator=generator).to(dtype) for batch, size in ((2, (19, 21)), (2, (5, 6)), (1, (5, 6)))]

    def sizes_packed_for():
        return [getattr(first.weight, "packed_for", None), getattr(strided.weight, "packed_for", None),
                getattr(upsample.packed[0][0], "packed_for", None)]

    with torch.inference_mode():
        plain = [convolutions(x) for x in inputs]
        pack_weights(layers, per_size=True)
        assert not first.weight.is_mkldnn and not any(kernel.is_mkldnn for kernel in upsample.packed[0])
        assert torch.equal(convolutions(inputs[0]), plain[0])
        # each layer's own input: the strided one's is the 1x1's output, the upsampling one's the strided output
        assert sizes_packed_for() == [(2, 4, 19, 21), (2, 32, 19, 21), (2, 32, 10, 11)]
        assert first.weight.is_mkldnn and all(kernel.is_mkldnn for kernel in upsample.packed[0])
        kept = first.weight, upsample.packed[0][0]
        assert torch.equal(convolutions(inputs[0]), plain[0])
        assert first.weight is kept[0] and upsample.packed[0][0] is kept[1]  # the same size: not packed again
        assert torch.equal(convolutions(inputs[1]), plain[1])
        assert sizes_packed_for() == [(2, 4, 5, 6), (2, 32, 5, 6), (2, 32, 3, 3)]
        # another batch: there the plain fp32 layers sum in another order (3.5e-7 of the largest value, measured),
        # bf16 ones the same (bit-equal); a wrong layout or kernel would be of order 1
        bound = 1e-6 if dtype == torch.float32 else 0.0
        assert relative_error(convolutions(inputs[2]), plain[2]) <= bound
        assert sizes_packed_for() == [(1, 4, 5, 6), (1, 32, 5, 6), (1, 32, 3, 3)]
        first.weight = torch.nn.Parameter(pack_convolution_weight(first.weight.to_dense(), (1, 1)), requires_grad=False)
        assert relative_error(convolutions(inputs[2]), plain[2]) <= bound and first.weight.packed_for == (1, 4, 5, 6)
        assert layers[1].weight.dim() == 4 and not layers[1].weight.is_mkldnn  # 1x1 kernels stay plain


@pytest.mark.skipif(not X86_ONEDNN, reason="packing is for oneDNN on x86")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_convolution_adds_its_sums_into_the_total_in_place(dtype):
    """convolution_added writes total + conv(x) into total where the kernel is packed and total is channels_last,
    and into a new tensor otherwise (a plain kernel, or total in another layout). In fp32 both give the sums of the
    plain convolution and addition, bit for bit (measured so here), as does the new tensor in bf16. In place in bf16,
    the convolution's fp32 sums are added before rounding, once where the plain path rounds twice: against the fp32
    sums of the same bf16 numbers, its largest error is within one rounding (2^-8 of the largest value): measured
    2.0e-3, and 3.8e-3 for the plain path's. A sum left out, or added twice, is of order 1."""
    if dtype == torch.bfloat16 and not cpu_has_bf16():
        pytest.skip("bf16 weights are packed only on CPUs with bf16 instructions")
    generator = torch.Generator().manual_seed(0)
    conv = random_layers(dtype)[2]  # the strided 3x3 convolution, 32 -> 32 channels
    x = torch.randn(2, 32, 18, 22, generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)
    total = torch.randn(2, 32, 9, 11, generator=generator).to(dtype)
    with torch.inference_mode():
        expected = conv(x) + total
        exact = conv(x.float()) + total.float()  # the same bf16 numbers' sums, rounded to fp32 only
        plain_total = total.clone()
        assert torch.equal(convolution_added(conv, x, plain_total), expected) and torch.equal(plain_total, total)
        pack_weights(conv)
        for layout, in_place in ((torch.contiguous_format, False), (torch.channels_last, True)):
            into = total.contiguous(memory_format=layout)
            added = convolution_added(conv, x, into)
            assert (added.data_ptr() == into.data_ptr()) == in_place, layout
            if dtype == torch.float32 or not in_place:
                assert torch.equal(added, expected)
            else:
                assert relative_error(added, exact) < 2**-8


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsampling_folded_once_computes_the_same_sums(channels_last):
    """A CPU model that is not packed keeps its upsampling layers' kernels folded, plain, in place of the 3x3 one
    (Upsample.fold, as the loader does): the sums of the kernels folded on every call, for an output size that is
    not twice the input's too (the 3x3 kernel unfolded again). The folded kernels follow the layer to another
    dtype, and the weight and bias given up are handed to `done`."""
    layer = random_layers(torch.float32)[3]
    x = torch.randn(2, 32, 10, 11, generator=torch.Generator().manual_seed(1))
    weight, bias, released = layer.conv.weight, layer.conv.bias, []
    with torch.inference_mode():
        plain, plain_resized = layer(x), layer(x, (19, 21))
        fold_upsampling(torch.nn.Sequential(layer), channels_last, done=released.append)
        folded, folded_resized = layer(x), layer(x, (19, 21))
    kernels = layer.packed[0]
    assert not hasattr(layer, "conv") and released == [weight, bias]
    assert [(kernel.shape, kernel.is_mkldnn) for kernel in kernels] == [((32, 32, 2, 2), False)] * 4
    assert all(kernel.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format) for kernel in kernels)
    assert folded.shape == (2, 32, 20, 22)
    # fp32 rounding, measured: channels_last kernels sum in another order (2.8e-7 of the largest value), and the
    # 3x3 kernel unfolded for the other size rounds its taps once (6.2e-7); a wrong tap would be of order 1
    assert torch.equal(folded, plain) if not channels_last else relative_error(folded, plain) < 1e-6
    assert relative_error(folded_resized, plain_resized) < 1e-6
    layer.to(torch.bfloat16)
    assert {kernel.dtype for kernel in layer.packed[0]} == {layer.packed[1].dtype} == {torch.bfloat16}


def test_weights_packed_from_another_dtype_equal_those_cast_first():
    """The loader leaves a packed model's weights as the checkpoint has them (fp32 here) and pack_weights casts
    each in the scratch buffer: the same packed layers, biases, norms and 1x1 kernels as from weights cast to
    bf16 first, so the same outputs, bit for bit. A half, fold or bias taken from a reused scratch buffer would
    differ."""
    if not cpu_has_bf16():
        pytest.skip("bf16 weights are packed only on CPUs with bf16 instructions")
    cast_first, from_fp32 = random_layers(torch.bfloat16), random_layers(torch.float32)
    originals, released = list(from_fp32.parameters()), []
    pack_weights(cast_first)
    pack_weights(from_fp32, torch.bfloat16, channels_last=True, done=released.append)
    assert all(p.dtype == torch.bfloat16 for p in from_fp32.parameters())
    assert from_fp32[1].weight.is_contiguous(memory_format=torch.channels_last)
    # each fp32 weight and bias handed to `done` once, when replaced (the loader releases its file pages)
    assert sorted(map(id, released)) == sorted(map(id, originals))
    x = torch.randn(2, 4, 19, 21, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.inference_mode():
        assert torch.equal(from_fp32(x), cast_first(x))


@pytest.mark.parametrize("packed", [False, True])
def test_upsampling_to_a_size_other_than_twice_is_nearest_upsampling_then_the_convolution(packed):
    """Where halving rounded up on the way down (9 -> 5 latents), the U-Net upsamples to one less than twice
    (5 -> 9): the layer then runs the plain computation, with the 3x3 kernel unfolded from the packed folded
    ones where pack dropped it. fp32 (packing fp32 weights works on every x86 CPU): the same sums in another
    order, so within 1e-6 of the largest value; a wrong tap would be of order 1."""
    if packed and not X86_ONEDNN:
        pytest.skip("packing is for oneDNN on x86")
    layer = Upsample(16).requires_grad_(False)
    weight, bias = layer.conv.weight.clone(), layer.conv.bias.clone()
    x = torch.randn(1, 16, 5, 7, generator=torch.Generator().manual_seed(2))
    if packed:
        layer.pack(torch.float32)
    with torch.inference_mode():
        for size in [(9, 13), (9, 14), (10, 13), (10, 14)]:
            expected = F.conv2d(F.interpolate(x, size=size, mode="nearest"), weight, bias, padding=1)
            assert relative_error(layer(x, size), expected) < 1e-6, size


# Against float64 on the same numbers, largest error against the largest value, measured here: fp32 1.1e-7
# (F.group_norm 0.8e-7 to 3.1e-7), bf16 2.6e-3 to 2.7e-3 (one rounding is 3.9e-3). At a mean 100 times the spread,
# F.group_norm on channels_last inputs subtracts squares of sums: 5.8e-3 in fp32 and 4.9e-2 in bf16, where into keeps
# 3.3e-6 and 2.7e-3. The fp32 bound is 3 times that; a variance divided by n - 1 instead of n would be 6.5e-5.
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 2**-7)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_a_group_norm_written_into_a_given_tensor_is_the_group_norm(dtype, bound, layout):
    """GroupNorm.into writes the group norm of its input into the tensor given, and the same numbers into the input
    itself when that is the tensor given; otherwise the input is left alone."""
    generator = torch.Generator().manual_seed(0)
    norm = GroupNorm(8, 32, eps=1e-6).requires_grad_(False)
    norm.weight.copy_(torch.randn(32, generator=generator))
    norm.bias.copy_(torch.randn(32, generator=generator))
    norm.to(dtype)
    for mean, spread in ((0.0, 1.0), (1.0, 0.01)):
        x = (torch.randn(2, 32, 40, 48, generator=generator) * spread + mean).to(dtype).contiguous(memory_format=layout)
        expected = F.group_norm(x.double(), 8, norm.weight.double(), norm.bias.double(), 1e-6)
        original, out = x.clone(), torch.empty_like(x)
        with torch.inference_mode():
            assert norm.into(x, out) is out
            assert torch.equal(x, original)
            assert relative_error(out, expected) < bound, (mean, spread)
            assert norm.into(x, x) is x and torch.equal(x, out)


def test_scratch_hands_back_a_name_s_tensor_while_its_shape_dtype_and_layout_hold():
    scratch = Scratch()
    x = torch.zeros(1, 4, 6, 6)
    a = scratch.tensor("a", (1, 8, 6, 6), like=x)
    assert scratch.tensor("a", (1, 8, 6, 6), like=x) is a
    assert scratch.tensor("b", (1, 8, 6, 6), like=x) is not a
    for shape, like in [((1, 8, 3, 3), x), ((1, 8, 6, 6), x.bfloat16()), ((1, 8, 6, 6), x.contiguous(memory_format=torch.channels_last))]:
        made = scratch.tensor("a", shape, like=like)
        assert made is not a and (made.shape, made.dtype) == (shape, like.dtype)
        assert made.is_contiguous(memory_format=torch.channels_last) == like.is_contiguous(memory_format=torch.channels_last)
        a = made
    scratch.clear()
    assert scratch.tensor("a", a.shape, like=a) is not a
    with torch.inference_mode():
        assert isinstance(scratch_for(x), Scratch) and isinstance(scratch_for(x.bfloat16()), Scratch)
        assert scratch_for(x.half()) is None  # GroupNorm.into takes fp32 and bf16
    assert scratch_for(x) is None  # autograd may need what the blocks would overwrite


def small_vae(kind: type, dtype: torch.dtype, packing: str) -> torch.nn.Module:
    """A VAE decoder or encoder of 3 levels, 32 and 64 channels, with random weights: its levels' first blocks change
    the widths (the decoder's narrows, the encoder's widens) and the others keep them."""
    model = kind(VAEConfig(base_width=32, width_multipliers=(1, 2, 2), blocks_per_level=2, num_groups=8)).requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            scale = 1.0 if isinstance(module, GroupNorm) and name == "weight" else 0.0
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2 + scale)
    model.to(dtype)
    if packing != "off":
        pack_weights(model, channels_last=True, per_size=packing.startswith("sizes"))
    return model


# Largest error against the largest value, against the model in float64 on the same inputs, measured here: fp32 with
# the temporaries shared 0.7e-6 to 1.2e-6 (each block with its own, 0.6e-6 to 1.4e-6), 2.6e-6 to 3.8e-6 by Winograd's
# algorithm; bf16 1.0e-2 to 1.8e-2 either way (the shared ones' at most 1.05 times the others'). A temporary
# overwritten while still needed would be of order 1.
@pytest.mark.parametrize("kind", [Decoder, Encoder])
@pytest.mark.parametrize("dtype, packing", [(dtype, packing) for dtype in (torch.float32, torch.bfloat16) for packing in ("off", "on", "sizes")]
                         + [(torch.float32, "on+winograd"), (torch.float32, "sizes+winograd")])  # Winograd's algorithm: fp32 alone
def test_vae_blocks_sharing_their_temporaries_compute_what_each_did_with_its_own(kind, dtype, packing, monkeypatch):
    """In inference on a CPU the VAE's blocks of one level share their temporaries (Scratch): each normalises into the
    scratch (GroupNorm.into), or into its input where the shortcut was its last reader, and writes its first
    convolution there too where the kernel is packed or Winograd's algorithm runs (convolution_into; here on every
    3x3 layer of stride 1, its second convolution's sums added into the shortcut's). The images and moments are as
    close to float64's as with fresh temporaries, and the scratch's tensors were handed back for reuse."""
    if packing != "off" and (not X86_ONEDNN or (dtype == torch.bfloat16 and not cpu_has_bf16())):
        pytest.skip("packing is for oneDNN on x86, bf16 on CPUs with bf16 instructions")
    winograd_calls = []
    if packing.endswith("+winograd"):
        monkeypatch.setenv("SD_KERNELS", "convolution=winograd")
        winograd_calls = winograd_on_every_layer(monkeypatch)
    generator = torch.Generator().manual_seed(1)
    if kind is Decoder:
        x = torch.randn(2, 4, 12, 10, generator=generator)
        run = lambda model, x: model(x)  # noqa: E731
    else:
        x = torch.rand(2, 3, 48, 40, generator=generator) * 2 - 1
        run = lambda model, x: model.stacked_moments(x)  # noqa: E731
    expected = run(small_vae(kind, torch.float64, "off"), x.double())
    model, handed = small_vae(kind, dtype, packing), []
    with torch.inference_mode():
        with monkeypatch.context() as patch:
            patch.setattr(sys.modules[kind.__module__], "scratch_for", lambda x: None)
            own = run(model, x.to(dtype))
        tensor = Scratch.tensor

        def recorded(scratch: Scratch, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
            handed.append((name, tensor(scratch, name, shape, like=like)))
            return handed[-1][1]

        monkeypatch.setattr(Scratch, "tensor", recorded)
        shared = run(model, x.to(dtype))
    if dtype == torch.float32:
        bound = 1e-5 if packing.endswith("+winograd") else 5e-6
        assert relative_error(shared, expected) < bound and relative_error(own, expected) < bound
    else:
        assert relative_error(shared, expected) < 1.25 * relative_error(own, expected)
    reused = {name for i, (name, t) in enumerate(handed) if any(t is u for _, u in handed[:i])}
    assert reused == ({"norm", "conv"} if packing != "off" else {"norm"})
    # each 3x3 layer of stride 1, in both runs
    assert len(winograd_calls) == (2 * sum(isinstance(layer, Conv2d) and layer.stride == (1, 1) and layer.kernel_size == (3, 3)
                                           for layer in model.modules()) if packing.endswith("+winograd") else 0)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference against the largest value."""
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def resident_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident memory from /proc")
def test_mapped_text_encoder_weights_leave_memory_and_come_back_unchanged(models):
    clip = models["clip"]
    mapped_mib = sum(p.numel() * p.element_size() for p in clip.mapped_parameters) / 2**20
    # every CLIP weight but the fused q/k/v projections stays in the checkpoint's pages (388 MiB in fp32)
    assert mapped_mib > 350
    tokens = encode(["a lighthouse at dusk"])
    with torch.inference_mode():
        before = clip(tokens)
        for parameter in clip.mapped_parameters:
            parameter.sum()  # reads every page, so all of them are resident
        resident = resident_mib()
        release_mapped(clip)
        released = resident_mib()
        after = clip(tokens)
    assert resident - released > 0.9 * mapped_mib, (resident, released, mapped_mib)
    assert torch.equal(before, after)
