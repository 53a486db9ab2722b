"""LoRA modules merged into our layers' weights for a render, and the weights put back after it.

Which layer a module changes is found by rules, not a table: each of our weight layers gets diffusers' module name
(kohya names modules so, with "." as "_", for SD 1.5 whatever the checkpoint's layout), from where it sits in the
U-Net (stage n of `input_blocks` is level n // 3 of diffusers' `down_blocks`, ...) and a few renames of our layers
(`time_proj` is diffusers' `time_emb_proj`, ...). Our fused q/k/v projections are three layers to a LoRA: rows of
one weight.

Merging: W + sum of multiplier * scale * dW over the modules that change W, in fp32, cast to W's dtype and laid
out (packed for oneDNN, channels_last) as W was. The layer's original weight object is kept aside and put back
afterwards, so that a later render without the LoRA uses exactly the weights of a fresh load; only the changed
layers are ever copied. The U-Net's packed feed-forward and upsampling layers (sd/models/unet.py GEGLU.pack,
sd/models/layers.py Upsample.pack) are changed in their packed forms: halves, and folded kernels (folding is linear).
"""

import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..models.unet import GEGLU, Downsample, ResidualBlock, SpatialTransformer, UNet
from ..errors import SDError
from ..models.layers import Conv2d, Linear, Upsample, fold_taps, layout_of, pack_linear_weight, packed_like, trim_heap, weight_parameter
from .lora import FILE_FIX, LoraFile, LoraTag, Module

log = logging.getLogger("sd")

PREFIXES = {"clip": "lora_te_", "diffusion": "lora_unet_"}
# our layer names within a U-Net block -> diffusers'
UNET_RENAMES = [
    (r"^time_proj$", "time_emb_proj"),
    (r"^shortcut$", "conv_shortcut"),
    (r"\.self_attention\.", ".attn1."),
    (r"\.cross_attention\.", ".attn2."),
    (r"\.([qkv])_proj$", r".to_\1"),
    (r"\.out_proj$", ".to_out.0"),
    (r"\.feed_forward(\.proj_in)?$", ".ff.net.0.proj"),  # the packed GEGLU, or its proj_in
    (r"\.feed_forward\.proj_out$", ".ff.net.2"),
]
CLIP_RENAMES = [(r"^layers\.", "text_model.encoder.layers."), (r"\.attention\.", ".self_attn."), (r"\.fc([12])$", r".mlp.fc\1")]
# a fused q/k/v projection -> its three layers' names ("{}" the letter)
FUSED = {"clip": (r"\.in_proj$", ".{}_proj"), "diffusion": (r"\.in_proj$", ".to_{}")}
BLOCK_KINDS = {ResidualBlock: "resnets", SpatialTransformer: "attentions", Downsample: "downsamplers", Upsample: "upsamplers"}
# a model's width where SD 1.5's text is 768 wide
OTHER_TEXT_WIDTHS = {1024: "an SD 2.x LoRA", 1280: "an SDXL LoRA", 2048: "an SDXL LoRA"}


@dataclass(frozen=True, eq=False)
class Site:
    """Where a LoRA module's change goes: the layer holding the weight (a Linear or Conv2d, or a packed GEGLU or
    Upsample), the rows of it (a part of a fused q/k/v weight), and the shape of that part."""

    model: str  # "clip" or "diffusion"
    name: str  # diffusers' module name: down_blocks.0.attentions.0.proj_in
    layer: nn.Module
    rows: slice | None
    shape: torch.Size


@dataclass(frozen=True)
class Change:
    site: Site
    module: Module
    multiplier: float
    dyn: int | None


def lora_sites(models: dict[str, nn.Module]) -> dict[str, Site]:
    """Every layer a LoRA can change, by kohya's name of it."""
    sites = {}
    for model_name, named in (("clip", clip_layers(models["clip"])), ("diffusion", unet_layers(models["diffusion"]))):
        for name, layer in named:
            shape = weight_shape(layer)
            pattern, template = FUSED[model_name]
            if re.search(pattern, name) and shape[0] % 3 == 0:
                third = shape[0] // 3
                parts = [(re.sub(pattern, template.format(letter), name), slice(i * third, (i + 1) * third)) for i, letter in enumerate("qkv")]
            else:
                parts = [(name, None)]
            for part_name, rows in parts:
                part_shape = shape if rows is None else torch.Size([rows.stop - rows.start, *shape[1:]])
                sites[PREFIXES[model_name] + part_name.replace(".", "_")] = Site(model_name, part_name, layer, rows, part_shape)
    return sites


def clip_layers(clip: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, layer in weight_layers(clip):
        yield renamed(name, CLIP_RENAMES), layer


def unet_layers(unet: UNet) -> Iterator[tuple[str, nn.Module]]:
    """The U-Net's weight layers under diffusers' names."""
    for block_name, block in unet_blocks(unet):
        for name, layer in weight_layers(block):
            if isinstance(layer, Upsample):  # packed: the layer itself stands for its convolution
                name = "conv"
            yield ".".join(part for part in (block_name, renamed(name, UNET_RENAMES)) if part), layer


def unet_blocks(unet: UNet) -> Iterator[tuple[str, nn.Module]]:
    """The U-Net's blocks under diffusers' names: input stage n is down block n // (blocks + 1), its resnet and
    attention number n % (blocks + 1), or its downsampler; output stages likewise."""
    per_level = unet.config.blocks_per_level + 1
    yield "conv_in", unet.input_blocks[0][0]
    yield "time_embedding", unet.time_embedding
    for stages, prefix in ((unet.input_blocks[1:], "down_blocks"), (unet.output_blocks, "up_blocks")):
        for n, stage in enumerate(stages):
            level, index = divmod(n, per_level)
            for layer in stage:
                kind = BLOCK_KINDS[type(layer)]
                position = 0 if kind in ("downsamplers", "upsamplers") else index
                yield f"{prefix}.{level}.{kind}.{position}", layer
    counts = Counter()
    for layer in unet.middle_block:
        kind = BLOCK_KINDS[type(layer)]
        yield f"mid_block.{kind}.{counts[kind]}", layer
        counts[kind] += 1
    yield "conv_out", unet.conv_out


def weight_layers(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The module's Linear and Conv2d layers, and its packed GEGLU and Upsample layers (which hold their weights
    in their own form), by our names relative to it."""
    packed = getattr(module, "packed", None) is not None
    if isinstance(module, (Linear, Conv2d)) or packed:
        yield prefix, module
        if not isinstance(module, GEGLU):  # a packed GEGLU still has its proj_out
            return
    for name, child in module.named_children():
        yield from weight_layers(child, f"{prefix}.{name}" if prefix else name)


def renamed(name: str, renames: list[tuple[str, str]]) -> str:
    for pattern, replacement in renames:
        name = re.sub(pattern, replacement, name)
    return name


def weight_shape(layer: nn.Module) -> torch.Size:
    """The weight's shape as diffusers has it: a packed GEGLU's two halves as one, a packed Upsample's 3x3 kernel."""
    if isinstance(layer, GEGLU):
        hidden = layer.packed[0]
        return torch.Size([2 * hidden.shape[0], hidden.shape[1]])
    if isinstance(layer, Upsample):
        kernel = layer.packed[0][0]
        return torch.Size([*kernel.shape[:2], 3, 3])
    return layer.weight.shape


def plan_changes(models: dict[str, nn.Module], loras: list[tuple[LoraTag, LoraFile]]) -> dict[str, dict[nn.Module, list[Change]]]:
    """For each model ("clip", "diffusion"), the changes to make to each of its layers. A module that maps to no
    layer of ours is an SDError naming it."""
    changes: dict[str, dict[nn.Module, list[Change]]] = {"clip": defaultdict(list), "diffusion": defaultdict(list)}
    sites = lora_sites(models) if loras else {}
    for tag, lora in loras:
        for name, module in lora.modules.items():
            site = sites.get(name)
            if site is None:
                raise SDError(f"LoRA {lora.name}: {name} matches no layer of SD 1.5; {FILE_FIX}")
            multiplier = tag.te if site.model == "clip" else tag.unet
            if multiplier:
                changes[site.model][site.layer].append(Change(site, module, multiplier, tag.dyn))
        if any(module.tensors.get("alpha") is not None and float(module.tensors["alpha"]) == 0 for module in lora.modules.values()):
            log.warning("LoRA %s has modules with alpha 0, which change nothing (as in AUTOMATIC1111)", lora.name)
    return changes


@contextmanager
def merged(changes: dict[nn.Module, list[Change]]):
    """The layers changed for the duration of the block, then given back their original weight objects."""
    originals, scratch = {}, Scratch()
    try:
        for layer, layer_changes in changes.items():
            originals[layer] = saved_state(layer)
            merge(layer, layer_changes, scratch)
        yield
    finally:
        for layer, state in originals.items():
            for name, value in state.items():
                setattr(layer, name, value)
        if originals:
            trim_heap()  # the merged copies' memory back to the system


class Scratch:
    """One fp32 buffer on the CPU for every layer's merged weight in turn: fresh memory for each would be faulted in
    and zeroed by the system anew, about a third of a LoRA's merging time on a CPU."""

    def __init__(self):
        self.buffer = torch.empty(0)

    def take(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        if device.type != "cpu":  # a GPU's caching allocator reuses memory already
            return torch.empty(shape, device=device)
        if self.buffer.numel() < shape.numel():
            self.buffer = torch.empty(shape.numel())
        return self.buffer[: shape.numel()].view(shape)


def saved_state(layer: nn.Module) -> dict:
    """The attributes that hold the layer's weights (the objects themselves: they are replaced, never changed)."""
    if isinstance(layer, (GEGLU, Upsample)):
        return {"packed": layer.packed}
    return {"weight": layer.weight, "bias": layer.bias}


def merge(layer: nn.Module, changes: list[Change], scratch: Scratch) -> None:
    """Adds the changes to an fp32 copy of the layer's weight (and bias), in place, and stores the result as the
    weight was stored. A packed Upsample's changes are summed apart and folded (merge_upsample). The packed
    layers that merge in their own form are CPU-only; the others merge on the weight's device."""
    folded = isinstance(layer, Upsample)
    total = torch.zeros(weight_shape(layer)) if folded else dense_weight(layer, scratch)
    original = None
    if any("dora_scale" in change.module.tensors for change in changes):  # DoRA's change depends on W (on the CPU)
        original = dense_weight(layer) if folded else total.to("cpu", copy=True)
    bias_delta = None
    for change in changes:
        site, module = change.site, change.module
        part = original[site.rows] if original is not None and site.rows is not None else original
        try:
            module.add_to(total[site.rows] if site.rows is not None else total, change.multiplier, part, change.dyn)
        except RuntimeError:  # the factors' shapes do not multiply into this layer's weight
            raise SDError(f"LoRA module {module.name} does not fit SD 1.5's layer of shape {tuple(site.shape)}"
                          f"{other_width(module)}; {FILE_FIX}") from None
        bias_update = module.bias_change()
        if bias_update is not None:
            bias_delta = torch.zeros(total.shape[0]) if bias_delta is None else bias_delta
            (bias_delta[site.rows] if site.rows is not None else bias_delta).add_(bias_update, alpha=change.multiplier)
    if isinstance(layer, GEGLU):
        merge_geglu(layer, total, bias_delta)
    elif folded:
        merge_upsample(layer, total, bias_delta)
    else:
        merge_plain(layer, total, bias_delta)


def other_width(module: Module) -> str:
    """", for an SD 2.x LoRA" where the module's input is a text width other than SD 1.5's."""
    widths = {tensor.shape[1] for key, tensor in module.tensors.items() if key in ("lora_down.weight", "hada_w1_b") and tensor.dim() >= 2}
    found = [OTHER_TEXT_WIDTHS[width] for width in widths if width in OTHER_TEXT_WIDTHS]
    return f": its input is {widths.pop()} wide, {found[0]}" if found else ""


def dense_weight(layer: nn.Module, scratch: Scratch | None = None) -> torch.Tensor:
    """A copy of the layer's weight in fp32, contiguous, diffusers' shape (a packed Upsample's 3x3 kernel unfolded
    from its folded ones), in `scratch` where given."""
    if isinstance(layer, Upsample):
        return layer.unfolded_kernel()
    # a GEGLU's packed halves one above the other, or the weight
    parts = layer.packed[::2] if isinstance(layer, GEGLU) else [layer.weight]
    parts = [part.to_dense() if part.is_mkldnn else part for part in parts]
    shape = torch.Size([sum(len(part) for part in parts), *parts[0].shape[1:]])
    copy = scratch.take(shape, parts[0].device) if scratch is not None else torch.empty(shape, device=parts[0].device)
    rows = 0
    for part in parts:
        copy[rows : rows + len(part)].copy_(part)
        rows += len(part)
    return copy


def merge_plain(layer: Linear | Conv2d, total: torch.Tensor, bias_delta: torch.Tensor | None) -> None:
    """The merged fp32 weight `total` stored as the layer's weight was: its dtype, packed (for the input size it was
    packed for) or channels_last."""
    weight = layer.weight
    merged = total.to(weight.dtype, copy=True)  # never the scratch buffer itself
    if weight.is_mkldnn:
        if isinstance(layer, Linear):
            merged = pack_linear_weight(merged)
        else:
            merged = packed_like(weight, merged, layer.padding, layer.stride, layer.dilation, layer.groups)
    elif weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last):
        merged = merged.contiguous(memory_format=torch.channels_last)
    layer.weight = weight_parameter(merged)
    if bias_delta is not None:
        layer.bias = nn.Parameter((layer.bias.float() + bias_delta.to(layer.bias.device)).to(layer.bias.dtype), requires_grad=False)


def merge_geglu(layer: GEGLU, total: torch.Tensor, bias_delta: torch.Tensor | None) -> None:
    """The merged fp32 weight `total` packed in halves: hidden layer's rows, then the gate's."""
    hidden, hidden_bias, gate, gate_bias = layer.packed
    halves = [pack_linear_weight(half.to(weight.dtype, copy=True)) for weight, half in zip((hidden, gate), total.chunk(2))]
    if bias_delta is not None:
        hidden_bias, gate_bias = ((bias.float() + half).to(bias.dtype) for bias, half in zip((hidden_bias, gate_bias), bias_delta.chunk(2)))
    layer.packed = halves[0], hidden_bias, halves[1], gate_bias


def merge_upsample(layer: Upsample, delta: torch.Tensor, bias_delta: torch.Tensor | None) -> None:
    """The folded kernels plus the folded change, packed or plain as they were: folding is linear, so
    fold(W + dW) = fold(W) + fold(dW)."""
    kernels, bias = layer.packed
    # (C, C, 3, 3) -> 4 x (C, C, 2, 2), in the order of sd/models/layers.py PARITIES
    folded = [kernel for row in fold_taps(delta, dim=2) for kernel in fold_taps(row, dim=3)]
    if bias_delta is not None:
        bias = (bias.float() + bias_delta).to(bias.dtype)

    def stored(kernel: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        merged = (kernel.to_dense().float() + change).to(kernel.dtype)
        if kernel.is_mkldnn:
            return packed_like(kernel, merged, (1, 1))
        return merged.contiguous(memory_format=layout_of(kernel))

    layer.packed = [stored(kernel, change) for kernel, change in zip(kernels, folded)], bias
