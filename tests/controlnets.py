"""Random-weight ControlNets in the original layout (lllyasviel's cldm.ControlNet), for tests and benchmarks.

The key set is written from the original model definition's parameters (the control_stage_config of
../shared/reference/cldm_v15.yaml, or a small copy of it), following the original code's naming, not from our
model: the manifest is what our converter is checked against. The zero convolutions get random weights too, or
a ControlNet would change nothing and a test of it prove nothing.
"""

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

CLDM_CONFIG = Path(__file__).resolve().parent.parent.parent / "shared" / "reference" / "cldm_v15.yaml"
HINT_CONVOLUTIONS = [(16, 1), (16, 1), (32, 2), (32, 1), (96, 2), (96, 1), (256, 2)]  # (out channels, stride)


def cldm_config() -> dict:
    return yaml.safe_load(CLDM_CONFIG.read_text())


def control_params() -> dict:
    return cldm_config()["model"]["params"]["control_stage_config"]["params"]


def conv(out_channels: int, in_channels: int, kernel: int) -> dict[str, list[int]]:
    return {"weight": [out_channels, in_channels, kernel, kernel], "bias": [out_channels]}


def linear(out_features: int, in_features: int, bias: bool = True) -> dict[str, list[int]]:
    return {"weight": [out_features, in_features], **({"bias": [out_features]} if bias else {})}


def norm(channels: int) -> dict[str, list[int]]:
    return {"weight": [channels], "bias": [channels]}


def prefixed(prefix: str, parts: dict[str, dict[str, list[int]]]) -> dict[str, list[int]]:
    return {f"{prefix}.{layer}.{name}": shape for layer, tensors in parts.items() for name, shape in tensors.items()}


def res_block(in_channels: int, out_channels: int, time_width: int) -> dict:
    parts = {"in_layers.0": norm(in_channels), "in_layers.2": conv(out_channels, in_channels, 3), "emb_layers.1": linear(out_channels, time_width),
             "out_layers.0": norm(out_channels), "out_layers.3": conv(out_channels, out_channels, 3)}
    if in_channels != out_channels:
        parts["skip_connection"] = conv(out_channels, in_channels, 1)
    return parts


def spatial_transformer(channels: int, context: int) -> dict:
    block = "transformer_blocks.0."
    return {
        "norm": norm(channels), "proj_in": conv(channels, channels, 1), "proj_out": conv(channels, channels, 1),
        **{f"{block}attn1.to_{letter}": linear(channels, channels, bias=False) for letter in "qkv"},
        f"{block}attn1.to_out.0": linear(channels, channels),
        f"{block}attn2.to_q": linear(channels, channels, bias=False),
        **{f"{block}attn2.to_{letter}": linear(channels, context, bias=False) for letter in "kv"},
        f"{block}attn2.to_out.0": linear(channels, channels),
        f"{block}ff.net.0.proj": linear(8 * channels, channels), f"{block}ff.net.2": linear(channels, 4 * channels),
        **{f"{block}norm{i}": norm(channels) for i in (1, 2, 3)},
    }


def controlnet_shapes(params: dict) -> dict[str, list[int]]:
    """Every tensor of an original ControlNet with these control_stage_config params, bare names -> shapes, named
    as cldm.ControlNet (and ldm's openaimodel) name them."""
    width, context, time_width = params["model_channels"], params["context_dim"], 4 * params["model_channels"]
    shapes = {**prefixed("time_embed", {"0": linear(time_width, width), "2": linear(time_width, time_width)})}
    hint, channels = {}, params["hint_channels"]
    for index, (out_channels, _) in enumerate(HINT_CONVOLUTIONS):
        hint[str(2 * index)] = conv(out_channels, channels, 3)
        channels = out_channels
    hint[str(2 * len(HINT_CONVOLUTIONS))] = conv(width, channels, 3)
    shapes.update(prefixed("input_hint_block", hint))
    shapes.update(prefixed("input_blocks.0", {"0": conv(width, params["in_channels"], 3)}))
    outputs, channels, block, resolution = [width], width, 1, 1
    for level, multiplier in enumerate(params["channel_mult"]):
        for _ in range(params["num_res_blocks"]):
            parts = {f"0.{name}": tensors for name, tensors in res_block(channels, width * multiplier, time_width).items()}
            channels = width * multiplier
            if resolution in params["attention_resolutions"]:
                parts.update({f"1.{name}": tensors for name, tensors in spatial_transformer(channels, context).items()})
            shapes.update(prefixed(f"input_blocks.{block}", parts))
            outputs.append(channels)
            block += 1
        if level < len(params["channel_mult"]) - 1:
            shapes.update(prefixed(f"input_blocks.{block}", {"0.op": conv(channels, channels, 3)}))
            outputs.append(channels)
            block += 1
            resolution *= 2
    shapes.update(prefixed("zero_convs", {f"{i}.0": conv(c, c, 1) for i, c in enumerate(outputs)}))
    middle = {**{f"0.{n}": t for n, t in res_block(channels, channels, time_width).items()},
              **{f"1.{n}": t for n, t in spatial_transformer(channels, context).items()},
              **{f"2.{n}": t for n, t in res_block(channels, channels, time_width).items()}}
    shapes.update(prefixed("middle_block", middle))
    shapes.update(prefixed("middle_block_out", {"0": conv(channels, channels, 1)}))
    return shapes


def random_controlnet_state_dict(params: dict, seed: int = 0, prefix: str = "control_model.", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Weights of sensible scale: normal(0, 0.02), norm scales near 1; the zero convolutions (and the hint encoder's
    last, zero-initialised too) normal(0, 0.5) with biases, so that the residuals are of the size of what they add to."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in controlnet_shapes(params).items():
        scale = 0.5 if name.startswith(("zero_convs.", "middle_block_out.", "input_hint_block.14.")) else 0.02
        tensor = torch.randn(shape, generator=generator) * scale
        if name.endswith(".weight") and len(shape) == 1:  # group and layer norms
            tensor += 1.0
        state[prefix + name] = tensor.to(dtype)
    return state


def write_controlnet(state: dict[str, torch.Tensor], path: Path, sd_config: dict | None = None) -> Path:
    """Writes .safetensors (with our config as metadata where it is not SD 1.5's), or a .pth as torch.save does."""
    if path.suffix == ".safetensors":
        save_file(state, str(path), metadata={"sd_config": json.dumps({"controlnet": sd_config})} if sd_config else None)
    else:
        torch.save(state, path)
    return path


def demo_sized_params(unet: dict) -> dict:
    """control_stage_config params matching a U-Net config of ours (the demo model's, from its sd_config)."""
    levels = len(unet["width_multipliers"])
    return {"in_channels": 4, "hint_channels": 3, "model_channels": unet["base_width"], "num_res_blocks": unet["blocks_per_level"],
            "channel_mult": list(unet["width_multipliers"]), "context_dim": unet["context_width"],
            "attention_resolutions": [2**level for level in range(levels) if level in unet["attention_levels"]]}
