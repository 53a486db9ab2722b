"""Layers whose weights may be stored in a narrower type than the one they compute in, the
upsampling layer that the U-Net and the VAE decoder share, and the temporaries (Scratch) that the blocks of
one VAE level share on a CPU.

Each layer computes in the dtype of its input and casts its weights to it on use. So a model stored
in bf16 (half the memory) runs in fp32 on a CPU without bf16 instructions, where bf16 arithmetic is
about 10x slower than fp32, and a VAE stored in fp16 decodes in fp32 on CUDA, where fp16 overflows.
When the dtypes already match, nothing is cast.

The cast goes into one scratch buffer per thread, device and dtype, reused by every layer: a fresh
allocation for each weight costs page faults that made a bf16-stored U-Net step a third slower on
CPU. The cast weights live only during the layer's call, which is safe because no weight of ours
takes part in autograd (the models are loaded with requires_grad False).
"""

import ctypes
import functools
import sys
import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import choice
from . import winograd

_scratch = threading.local()


def cast_to(dtype: torch.dtype, *tensors: torch.Tensor | None, channels_last: bool = False) -> list[torch.Tensor | None]:
    """The tensors in `dtype`: themselves if already so, else copies in the scratch buffer, laid out with
    their own strides, or with `channels_last` as channels_last convolution kernels where they are not."""
    def needs_copy(t: torch.Tensor) -> bool:
        return t.dtype != dtype or (channels_last and t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last))

    if not any(t is not None and needs_copy(t) for t in tensors):
        return list(tensors)
    device = next(t.device for t in tensors if t is not None)
    buffer = scratch_buffer("cast", sum(t.numel() for t in tensors if t is not None), device, dtype)
    cast, offset = [], 0
    for tensor in tensors:
        if tensor is None:
            cast.append(None)
            continue
        # called for every layer of every step: derive channels_last strides only where asked
        strides = tensor.stride()
        if channels_last and tensor.dim() == 4:
            strides = torch.empty(tensor.shape, device="meta", memory_format=torch.channels_last).stride()
        view = buffer.as_strided(tensor.shape, strides, offset)
        cast.append(view.copy_(tensor))
        offset += tensor.numel()
    return cast


def scratch_buffer(use: str, needed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """This thread's buffer for `use` on `device` in `dtype`, of at least `needed` elements (grown where smaller)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get((use, device, dtype))
    if buffer is None or buffer.numel() < needed:
        # an ordinary tensor, not an inference one: those cannot be written outside torch.inference_mode()
        with torch.inference_mode(False):
            buffer = buffers[(use, device, dtype)] = torch.empty(needed, dtype=dtype, device=device)
    return buffer


def release_scratch() -> None:
    """Frees this thread's scratch buffers (a stage done with its weights need not keep the largest one's copy)."""
    _scratch.__dict__.pop("buffers", None)


_GLIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def trim_heap() -> None:
    """With glibc, hands the free pages of the heap back to the system (freed memory otherwise stays ours)."""
    if hasattr(_GLIBC, "malloc_trim"):
        _GLIBC.malloc_trim(0)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """F.linear with the weights cast to the input's dtype, then GELU if asked. Token sequences run as a
    convolution where that is faster (sd/kernels.py); packed weights (pack_weights) as oneDNN's product, which
    applies the GELU to its fp32 sums before they are rounded and stored: a pass over the output less, and one
    rounding less (the U-Net's gated feed-forward at 64x64 takes 25 ms instead of 35)."""
    if weight.is_mkldnn:
        if x.dtype == weight.dtype:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")
        weight = weight.to_dense()
    weight, bias = cast_to(x.dtype, weight, bias)
    if x.dim() == 3 and choice("linear", x.device, x.dtype) == "convolution":  # (B, L, C)
        out = linear_as_convolution(x, weight, bias)
    else:
        out = F.linear(x, weight, bias)
    return F.gelu(out) if gelu else out


def linear_as_convolution(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear computed as a 1x1 convolution over a channels_last view of the tokens. On a CPU, fp32
    F.linear runs MKL's GEMM, which on a Zen 5 was 1.5-2.3x slower than oneDNN's convolution (bf16 F.linear
    runs oneDNN already). Both views are free; the sum is the same (fp32 results agree to rounding)."""
    *leading, width = x.shape
    # (..., C_in) -> (1, C_in, N, 1), laid out as the (N, C_in) rows it already is
    tokens = x.reshape(1, -1, 1, width).permute(0, 3, 1, 2)
    # (1, C_in, N, 1) -> (1, C_out, N, 1) -> (..., C_out)
    out = F.conv2d(tokens, weight[:, :, None, None], bias)
    return out.permute(0, 2, 3, 1).reshape(*leading, weight.shape[0])


class Conv2d(nn.Conv2d):
    packs_per_size = False  # set by pack_weights where kernels are packed for each input size (sd/kernels.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.by_winograd(x) if self.runs_winograd(x) else self.direct(x)

    def direct(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x) where Winograd's algorithm does not run: oneDNN's kernel on a CPU (PyTorch's elsewhere)."""
        weight = self.kernel_for(x)
        if weight.is_mkldnn:
            if x.dtype == weight.dtype:
                return packed_convolution(x, weight, self.bias, self.padding, self.stride, self.dilation, self.groups)
            weight = weight.to_dense()
        # kernels kept as the checkpoint has them (sd/files/loader.py) are cast channels_last where that pays
        # (sd/kernels.py; 1.6x faster on a Zen 5)
        channels_last = choice("channels_last", x.device, x.dtype) == "on"
        return self._conv_forward(x, *cast_to(x.dtype, weight, self.bias, channels_last=channels_last))

    def kernel_for(self, x: torch.Tensor, plain: bool = False) -> torch.Tensor:
        """The weight, first packed for x's shape where the layer packs per input size and it is not so packed yet: at
        the first call, where the shape changed, and where the weight was replaced by one packed otherwise; with `plain`
        (Winograd's algorithm, which transforms the plain kernel) unpacked instead."""
        if not self.packs_per_size or x.dtype != self.weight.dtype:
            return self.weight
        if plain:
            if self.weight.is_mkldnn:
                self.weight = weight_parameter(self.weight.to_dense().contiguous(memory_format=torch.channels_last))
        elif not packed_for_shape_of(self.weight, x):
            self.weight = weight_parameter(packed_for_input(self.weight, x.shape, self.padding, self.stride, self.dilation, self.groups))
            trim_heap()  # as pack_weights does: the plain weight's memory is a hole the next packed one seldom fits
        return self.weight

    def by_winograd(self, x: torch.Tensor, into: torch.Tensor | None = None, add: bool = False) -> torch.Tensor:
        """forward(x) by Winograd's algorithm, into `into` and added to it with `add` (winograd_convolution)."""
        [weight, bias] = cast_to(x.dtype, self.kernel_for(x, plain=True), self.bias)
        buffer = functools.partial(scratch_buffer, device=x.device, dtype=x.dtype)
        return winograd.winograd_convolution(x, weight, bias, buffer, into, add)

    def runs_winograd(self, x: torch.Tensor) -> bool:
        """Whether x is convolved by Winograd's algorithm (sd/models/winograd.py): where it suits the layer and x, and
        the CPU's timing chose it (sd/kernels.py), for a kernel not packed at load (see keeps_plain)."""
        return (winograd.suits(self, x) and (self.packs_per_size or not self.weight.is_mkldnn)
                and choice("convolution", x.device, x.dtype) == "winograd")

    def keeps_plain(self, dtype: torch.dtype) -> bool:
        """Whether pack_weights leaves this layer's kernel plain for Winograd's algorithm, which transforms plain
        kernels: where it takes the layer and the CPU's timing chose it for `dtype`."""
        return dtype == torch.float32 and winograd.takes(self) and choice("convolution", torch.device("cpu"), dtype) == "winograd"


def packed_convolution(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding, stride=(1, 1), dilation=(1, 1), groups: int = 1, into: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN's convolution with a weight that pack_weights packed; written into `into` (its contents lost) where
    that is a tensor of its output's shape that takes sums in place (takes_sums_in_place), else a new tensor. Zeroing
    `into` is a pass over memory already mapped: 1.4 ms for 64 MiB against about 20 for a fresh output's page faults
    (Zen 5)."""
    if into is not None and takes_sums_in_place(into, x):
        return added_in_place(into.zero_(), x, weight, bias, padding, stride, dilation, groups)
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups, "none", [], None)


def takes_sums_in_place(total: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether oneDNN can add a packed convolution's sums of x into `total`: channels_last, in x's dtype."""
    return total.dtype == x.dtype and total.is_contiguous(memory_format=torch.channels_last)


def added_in_place(total: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding, stride, dilation, groups: int) -> torch.Tensor:
    """total + the packed convolution of x, by oneDNN's add post-op into `total` (see takes_sums_in_place)."""
    return torch.ops.mkldnn._convolution_pointwise_(total, x, weight, bias, padding, stride, dilation, groups, "add", None, None, [], None)


def convolution_added(conv: Conv2d, x: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """total + conv(x), written into `total` where oneDNN can add its sums there (a packed kernel, and `total` in the
    channels_last layout of its output); otherwise into a new tensor. Either way `total` is the caller's no more.
    In place there is no output to page-fault in, nor a pass to add it: for 128 channels at 512x512 in bf16, 84 ms
    against 89 for the convolution and 8 for the addition (Zen 5), and 16,384 page faults fewer."""
    if conv.runs_winograd(x):
        return conv.by_winograd(x, into=total, add=True)
    weight = conv.kernel_for(x)
    if weight.is_mkldnn and x.dtype == weight.dtype and takes_sums_in_place(total, x):
        return added_in_place(total, x, weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups)
    return conv.direct(x).add_(total)


def convolution_into(conv: Conv2d, x: torch.Tensor, scratch: "Scratch", name: str) -> torch.Tensor:
    """conv(x), written into scratch's tensor `name` (its contents lost) where a packed kernel can write there (x
    channels_last, as the scratch's tensor then is) or Winograd's algorithm runs; otherwise a new tensor, and no
    scratch tensor is made."""
    sides = [
        (side + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
        for side, pad, dilation, kernel, stride in zip(x.shape[2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride)
    ]
    if conv.runs_winograd(x):
        return conv.by_winograd(x, into=scratch.tensor(name, (x.shape[0], conv.out_channels, *sides), like=x))
    weight = conv.kernel_for(x)
    if not (weight.is_mkldnn and weight.dtype == x.dtype and x.is_contiguous(memory_format=torch.channels_last)):
        return conv.direct(x)
    out = scratch.tensor(name, (x.shape[0], conv.out_channels, *sides), like=x)
    return packed_convolution(x, weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups, into=out)


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight)


def pack_convolution_weight(weight: torch.Tensor, padding, stride=(1, 1), dilation=(1, 1), groups: int = 1, input_shape=None) -> torch.Tensor:
    # laid out for inputs of `input_shape` (B, C, H, W) (without one oneDNN assumes 1x1), by default one 8x8 input.
    # At SD 1.5's widths this runs as fast as a layout for 64x64 inputs at every size (guided U-Net steps at 256 and
    # 512: 1.00x and 0.98x, the same sums); at 48-192 channels (the demo model's) that one was 10-50x slower than
    # plain, reordered on each call. With AVX2 alone no one layout suits every size (sd/kernels.py): there kernels
    # are packed for each input shape they meet (packed_for_input).
    typical_input = input_shape or (1, weight.shape[1] * groups, 8, 8)
    return torch.ops.mkldnn._reorder_convolution_weight(weight, padding, stride, dilation, groups, typical_input)


def packed_for_input(kernel: torch.Tensor, shape, padding, stride=(1, 1), dilation=(1, 1), groups: int = 1) -> torch.Tensor:
    """`kernel` (plain, or packed for other inputs) packed for inputs of `shape` (B, C, H, W), which it names as its
    `packed_for`. oneDNN lays a kernel out for a class of input shapes and reorders one packed for another class on
    every call, up to 10x slower than a plain kernel (benchmarks/README.md); the batch counts too (with AVX2, 640
    channels at 24x24 packed for one input ran two 2.8x slower than plain). A 1280-channel fp32 kernel takes
    20-22 ms to pack from plain channels_last, 58-68 ms from another packing, once; a call with it plain 22-37 ms
    (Zen 5, AVX-512 and capped at AVX2)."""
    plain = kernel.to_dense() if kernel.is_mkldnn else kernel
    packed = pack_convolution_weight(plain, padding, stride, dilation, groups, tuple(shape))
    packed.packed_for = tuple(shape)
    return packed


def packed_for_shape_of(kernel: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether `kernel` is packed for x's shape (packed_for_input), or in another dtype than x's and so never packed
    for it (it is cast on use)."""
    return kernel.dtype != x.dtype or getattr(kernel, "packed_for", None) == x.shape


def packed_like(kernel: torch.Tensor, plain: torch.Tensor, padding, stride=(1, 1), dilation=(1, 1), groups: int = 1) -> torch.Tensor:
    """`plain` packed as the packed `kernel` is: for the input shape it names (packed_for_input), else for 8x8 inputs."""
    plain = plain.contiguous(memory_format=torch.channels_last)
    shape = getattr(kernel, "packed_for", None)
    if shape is None:
        return pack_convolution_weight(plain, padding, stride, dilation, groups)
    return packed_for_input(plain, shape, padding, stride, dilation, groups)


def weight_parameter(weight: torch.Tensor) -> nn.Parameter:
    """`weight` as a layer's frozen parameter, naming the input shape it is packed for where it names one (a new
    parameter object does not keep the tensor's attributes)."""
    parameter = nn.Parameter(weight, requires_grad=False)
    if hasattr(weight, "packed_for"):
        parameter.packed_for = weight.packed_for
    return parameter


def packing_pays(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether pack_weights pays for models whose weights are stored in `dtype` on `device`: sd/kernels.py
    decides (never where bf16 computes in fp32). On a Zen 4 a packed guided 512x512 U-Net step took 0.87-0.91x the
    plain one's time in fp32, and a render's peak fell (the file's pages are handed back as the copies are made),
    for 1.7 s more at the load; with AVX2 alone kernels packed for one size made other image sizes 3-5x slower
    (sd/kernels.py's OTHER_SIZES), unless packed per size (packs_per_size)."""
    return choice("packing", device, dtype) != "off"


def packs_per_size(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether packed convolution kernels are packed for each input size they meet (packing=sizes, sd/kernels.py)."""
    return choice("packing", device, dtype) == "sizes"


def fold_upsampling(model: nn.Module, channels_last: bool, done) -> None:
    """Folds the model's upsampling layers' kernels once (Upsample.fold), for a CPU model that is not packed and
    computes in its weights' dtype; `done` is called with each weight and bias dropped."""
    for layer in [layer for layer in model.modules() if isinstance(layer, Upsample)]:
        replace_own_weights(layer, lambda: layer.fold(channels_last), done)


def replace_own_weights(layer: nn.Module, replace, done) -> None:
    """Runs `replace()`, which stores the layer's weights in another form (pack, fold), then calls `done` with each
    parameter the layer no longer holds."""
    before = list(layer.parameters())
    replace()
    kept = {id(parameter) for parameter in layer.parameters()}
    for parameter in before:
        if id(parameter) not in kept:
            done(parameter)


def pack_weights(model: nn.Module, dtype: torch.dtype | None = None, channels_last: bool = True, done=None, per_size: bool = False) -> None:
    """Stores the weights of the model's convolutions and linear layers in oneDNN's own blocked layouts, in
    place of the plain ones.

    oneDNN reorders a plain bf16 weight into that layout on every call; for the U-Net's wide, low-resolution
    layers that costs more than the product itself (a 2560 -> 1280 channel 3x3 convolution at 8x8: 21 ms a
    call, 9 ms packed; the feed-forward layers at 32x32: 42 -> 30 ms), and the reordered copy (up to 59 MB) is
    page-faulted in anew each time. The sums are the same: results bit-equal, but where `linear` takes the
    GELU into oneDNN's product, which then rounds once instead of twice. For a CPU model that computes in its
    stored dtype; `weight.to_dense()` gives a packed weight back.

    The weights may still be the checkpoint's (another dtype, memory-mapped: sd/files/loader.py): each is then
    cast to `dtype` in the scratch buffer and packed from there, which spares a fresh copy of every weight (a
    2560 -> 1280 kernel cast and packed in 66 ms instead of 97 on a Zen 4), and the model's other parameters are
    cast after, convolution kernels `channels_last`. `done` is called with each weight once it is replaced.

    Layers with a `pack` method pack themselves: the upsampling layers store their kernel folded
    (Upsample.pack), the U-Net's feed-forward layers their first weight in halves (GEGLU.pack). 1x1 kernels
    stay plain: their best layout depends on the input's size (one chosen for 64x64 inputs runs 40-80x slower
    at 4x4, the lowest level of a 256x256 image) and they are a small share of the time (about 12 ms of a
    2.5 s step).

    With `per_size` the convolution kernels (3x3, and the upsampling layers' folded ones) are left plain, cast to
    `dtype` with the other parameters, and each is packed at its first call for the input shape (batch, height and
    width) it meets there, and anew where that changes (Conv2d.kernel_for): one packing a kernel, as here, while it
    stays. So are the 3x3 kernels that Winograd's algorithm takes where the CPU's timing chose it (Conv2d.keeps_plain):
    plain where it runs, packed for the inputs it leaves to oneDNN.
    """
    done = done or (lambda tensor: None)
    for layer in [layer for layer in model.modules() if hasattr(layer, "pack")]:
        stored = dtype or next(layer.parameters()).dtype
        if isinstance(layer, Upsample):
            layer.packs_per_size = per_size
        replace_own_weights(layer, lambda: layer.pack(stored), done)
        trim_heap()
    for layer in model.modules():
        if isinstance(layer, Conv2d) and layer.kernel_size != (1, 1):
            if per_size or layer.keeps_plain(dtype or layer.weight.dtype):
                layer.packs_per_size = True  # cast below with the other plain parameters, packed at its first call
                continue
            [weight] = cast_to(dtype or layer.weight.dtype, layer.weight, channels_last=True)
            packed = pack_convolution_weight(weight, layer.padding, layer.stride, layer.dilation, layer.groups)
        elif isinstance(layer, Linear):
            [weight] = cast_to(dtype or layer.weight.dtype, layer.weight)
            packed = pack_linear_weight(weight)
        else:
            continue
        done(layer.weight)
        layer.weight = nn.Parameter(packed, requires_grad=False)
        # the plain weight's memory is a hole the next packed one seldom fits: without this the load's peak
        # grows by 0.4 GiB
        trim_heap()
    if dtype is not None:
        cast_parameters(model, dtype, channels_last, done)
    release_scratch()  # as large as the largest weight cast, which the layers' own casts seldom need
    trim_heap()


def cast_parameters(model: nn.Module, dtype: torch.dtype, channels_last: bool, done) -> None:
    """The model's plain parameters replaced by copies in `dtype`, 4-d ones `channels_last`, where not so yet."""
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.is_mkldnn:
                continue
            layout = torch.channels_last if channels_last and parameter.dim() == 4 else torch.preserve_format
            cast = parameter.to(dtype, memory_format=layout)
            if cast is not parameter:
                setattr(module, name, nn.Parameter(cast, requires_grad=False))
                done(parameter)


class GroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, *cast_to(x.dtype, self.weight, self.bias), self.eps)

    def into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """forward(x) written into `out`, which may be x itself (F.group_norm has no output argument), for an fp32
        or bf16 x. Per sample, each channel's mean and variance in fp32 (batch norm's statistics, one pass), then
        each group's from its channels', and batch norm's fp32 scale and shift with those as its running statistics.
        As close to fp64 as F.group_norm on contiguous inputs; closer on channels_last ones, where F.group_norm
        subtracts squares of sums (at a mean 100 times the spread, fp32: 3.3e-6 of the largest value against 5.8e-3;
        tests/test_cpu_paths.py)."""
        groups, eps = self.num_groups, self.eps
        weight, bias = self.weight.float(), self.bias.float()
        # fp32 running statistics, which make the batch statistics fp32 too (they would be x's dtype); overwritten
        running = torch.zeros(2, x.shape[1])
        for i in range(x.shape[0]):
            sample = x[i : i + 1]
            # (1, C, H, W) -> (C,) each -> (G, C / G): a group's variance is the mean of its channels' variances
            # plus the variance of their means
            statistics = torch.batch_norm_update_stats(sample, running[0], running[1], 1.0)
            mean, var = (s.view(groups, -1) for s in statistics)
            group_mean = mean.mean(1, keepdim=True)
            group_var = (var + (mean - group_mean).square()).mean(1, keepdim=True)
            channel_mean, channel_var = group_mean.expand_as(mean).flatten(), group_var.expand_as(var).flatten()
            torch.ops.aten.native_batch_norm.out(
                sample, weight, bias, channel_mean, channel_var, False, 0.0, eps,
                out=out[i : i + 1], save_mean=_NOTHING, save_invstd=_NOTHING,
            )
        return out


_NOTHING = torch.empty(0)  # batch norm's saved statistics, which inference does not compute


def scratch_for(x: torch.Tensor) -> "Scratch | None":
    """A Scratch for a VAE's blocks where reusing temporaries is safe and pays: inference (nothing for autograd to
    keep) on a CPU, in fp32 or bf16 (GroupNorm.into's dtypes); else None."""
    reusable = x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and not torch.is_grad_enabled()
    return Scratch() if reusable else None


class Scratch:
    """Temporaries kept by name and reused while their shape stays the same. On a CPU a fresh tensor over 32 MiB is
    a new mapping from glibc, page-faulted in: the decoder's blocks at full resolution would fault in 64 MiB for
    each of their two temporaries (bf16, 512x512), about 20 ms each, more than the group norm that fills one."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def tensor(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of `shape` with the dtype, device and layout of `like`; the last one of that
        name if it has them, else a new one, made after the last one is dropped."""
        kept = self.tensors.pop(name, None)
        layout = layout_of(like)
        if kept is None or (kept.shape, kept.dtype, layout_of(kept)) != (shape, like.dtype, layout):
            del kept  # freed before the new one is made
            kept = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=layout)
        self.tensors[name] = kept
        return kept

    def clear(self) -> None:
        self.tensors.clear()


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, *cast_to(x.dtype, self.weight, self.bias), self.eps)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution, computed without the upsampled image.

    Each output pixel of a given parity (row and column odd or even) sees only 2x2 distinct input pixels,
    so the 3x3 kernel folds into four 2x2 kernels applied at the input's resolution: 16 instead of 36
    multiply-adds per input pixel and channel pair, and no 4x-sized intermediate. It is the same sum in
    another order (fp32 results agree to rounding).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)
        self.packed: tuple[list[torch.Tensor], torch.Tensor] | None = None  # the folded kernels and bias: see pack, fold
        self.packs_per_size = False  # see pack

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        """x upsampled to `size` (default: twice its own), as nearest-neighbour upsampling then the convolution."""
        batch, _, height, width = x.shape
        if size is not None and tuple(size) != (2 * height, 2 * width):
            return self.resized(x, tuple(size))
        kernels, bias = self.kernels_for(x)
        # (B, C, H, W) -> (B, C, 2H, 2W), filled a quarter (one row and column parity) at a time
        out = torch.empty(batch, kernels[0].shape[0], 2 * height, 2 * width, dtype=x.dtype, device=x.device, memory_format=layout_of(x))
        phase = None
        for (row, col), kernel in zip(PARITIES, kernels):
            # (B, C, H, W) -> (B, C, H + 1, W + 1), whose output (i + row, j + col) saw the input pixels
            # (i - 1 + row .. i + row, j - 1 + col .. j + col): the upsampled image's output (2i + row, 2j + col)
            if kernel.is_mkldnn:
                phase = packed_convolution(x, kernel, bias, (1, 1), into=phase)  # over the last phase, copied out
            else:
                phase = F.conv2d(x, kernel, bias, padding=1)
            out[:, :, row::2, col::2] = phase[:, :, row : row + height, col : col + width]
        return out

    def resized(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The plain computation, for a size other than 2x: there the last row or column of the upsampled image
        is missing, and the folded kernels would sum taps over it."""
        # (B, C, H, W) -> (B, C, *size), then the 3x3 convolution at that size
        upsampled = F.interpolate(x, size=size, mode="nearest")
        if self.packed is None:
            return self.conv(upsampled)
        return F.conv2d(upsampled, self.unfolded_kernel().to(x.dtype), self.packed[1].to(x.dtype), padding=1)

    def unfolded_kernel(self) -> torch.Tensor:
        """The 3x3 kernel that pack or fold dropped, in fp32: unfolded from the folded ones, along the columns for
        each row parity, then along the rows."""
        kernels = [kernel.to_dense().float() for kernel in self.packed[0]]
        rows = [unfold_taps(kernels[2 * row], kernels[2 * row + 1], dim=3) for row in (0, 1)]
        return unfold_taps(*rows, dim=2)

    def kernels_for(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The folded kernels and the bias in x's dtype, packed first for x's shape where the layer packs per input
        size and they are not so packed yet (see Conv2d.kernel_for)."""
        if self.packs_per_size and not packed_for_shape_of(self.packed[0][0], x):
            kernels, bias = self.packed
            self.packed = [packed_for_input(kernel, x.shape, (1, 1)) for kernel in kernels], bias
        return self.folded_kernels(x.dtype)

    def folded_kernels(self, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The four 2x2 kernels in the order of PARITIES, and the bias, in `dtype`."""
        if self.packed is not None:
            kernels, bias = self.packed
            if kernels[0].dtype == dtype:
                return kernels, bias
            *kernels, bias = cast_to(dtype, *(kernel.to_dense() for kernel in kernels), bias)
            return kernels, bias
        weight, bias = cast_to(dtype, self.conv.weight, self.conv.bias)
        return [kernel for row_kernel in fold_taps(weight, dim=2) for kernel in fold_taps(row_kernel, dim=3)], bias

    def pack(self, dtype: torch.dtype) -> None:
        """Keeps the folded kernels in `dtype`, packed for oneDNN (see pack_weights), in place of the 3x3 one,
        which is dropped. Folded on every call, the U-Net's three upsampling layers took 0.17 s of a bf16 step;
        folded once and packed, 0.08 s. The folded kernels take 16/9 of the 3x3 one's memory (+51 MB for the U-Net).
        Where the layer packs per input size (packs_per_size, set by pack_weights), they are kept plain and packed at
        the first call (kernels_for)."""
        kernels, bias = self.folded_copies(dtype)
        kernels = [kernel.contiguous(memory_format=torch.channels_last) for kernel in kernels]
        self.packed = (kernels if self.packs_per_size else [pack_convolution_weight(kernel, (1, 1)) for kernel in kernels]), bias
        del self.conv

    def fold(self, channels_last: bool) -> None:
        """Keeps the folded kernels, plain, in place of the 3x3 one, which is dropped: for CPU models that are not
        packed and compute in their weights' dtype (where they compute in fp32, folding their bf16 taps in bf16
        would round each sum once more). Folding on every call costs about 0.1 s of a guided fp32 U-Net step on a
        Zen 4: folded once, a 256x256 step took 0.93-0.96x diffusers' time in turns against 0.98-1.07x, a 512x512
        one 0.5-1.1 % less. The folded kernels take 7/9 of the 3x3 ones' memory more (+0.12 GiB at the peak of a
        512x512 fp32 render, 4.90 against 4.78)."""
        kernels, bias = self.folded_copies(self.conv.weight.dtype)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.packed = [kernel.contiguous(memory_format=layout) for kernel in kernels], bias
        del self.conv

    def _apply(self, fn, recurse: bool = True):
        """Moves and casts plain folded kernels with the module's parameters (.to(device), .to(dtype)); packed ones
        are oneDNN's, CPU-only."""
        super()._apply(fn, recurse)
        if self.packed is not None and not self.packed[0][0].is_mkldnn:
            kernels, bias = self.packed
            self.packed = [fn(kernel) for kernel in kernels], fn(bias)
        return self

    def folded_copies(self, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The folded kernels and the bias in `dtype`, in memory of their own (never the scratch buffer, nor the
        file's pages, which are handed back once the 3x3 kernel is dropped)."""
        kernels, _ = self.folded_kernels(dtype)  # made by torch.stack
        return kernels, self.conv.bias.to(dtype, copy=True)


# (row, column) parity of the output pixels that each folded kernel makes
PARITIES = ((0, 0), (0, 1), (1, 0), (1, 1))


def fold_taps(weight: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3-tap kernel along `dim` as the two 2-tap kernels that act on a 2x-nearest-upsampled input:
    even outputs see input pixels (i-1, i) with taps (w0, w1 + w2), odd ones (i, i+1) with (w0 + w1, w2)."""
    w0, w1, w2 = weight.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def unfold_taps(even: torch.Tensor, odd: torch.Tensor, dim: int) -> torch.Tensor:
    """The 3-tap kernel that fold_taps made `even` and `odd` of."""
    (w0, _), (w0_w1, w2) = even.unbind(dim), odd.unbind(dim)
    return torch.stack([w0, w0_w1 - w0, w2], dim)


def layout_of(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else torch.contiguous_format
