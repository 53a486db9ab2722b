"""Random-weight SD 1.5 checkpoints with the original key names and shapes, for tests and benchmarks."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

KEYS_FILE = Path(__file__).parent / "fixtures" / "sd15_keys.json"


def sd15_shapes() -> dict[str, list[int]]:
    """Every tensor of the original v1-5-pruned-emaonly checkpoint: name -> shape (1,143 entries)."""
    return json.loads(KEYS_FILE.read_text())


def schedule_buffers() -> dict[str, torch.Tensor]:
    """The training schedule the original checkpoint stores beside the weights (we ignore it on load)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1 - previous) / (1 - alphas_cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": previous,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * previous.sqrt() / (1 - alphas_cumprod),
        "posterior_mean_coef2": (1 - previous) * (1 - betas).sqrt() / (1 - alphas_cumprod),
    }
    return {name: value.float() for name, value in buffers.items()}


def is_norm(name: str) -> bool:
    return any(part in name for part in ("norm", "in_layers.0.", "out_layers.0.", ".out.0."))


def random_sd15_state_dict(seed: int = 0, dtype=torch.float32, overrides: dict[str, list[int]] | None = None, prefix: str = "") -> dict[str, torch.Tensor]:
    """Weights of sensible scale, so activations stay finite: normal(0, 0.02), norm scales near 1. With `prefix`,
    only the tensors whose names start with it ("first_stage_model.": the VAE)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {name: shape for name, shape in {**sd15_shapes(), **(overrides or {})}.items() if name.startswith(prefix)}
    state = {name: value for name, value in schedule_buffers().items() if name.startswith(prefix)}
    for name, shape in shapes.items():
        if name in state:
            continue
        if name.endswith("position_ids"):
            state[name] = torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
            continue
        tensor = torch.randn(shape, generator=generator) * 0.02
        if is_norm(name) and name.endswith(".weight"):
            tensor += 1.0
        state[name] = tensor.to(dtype)
    return state


def write_checkpoint(state: dict[str, torch.Tensor], path: Path) -> Path:
    """Writes .safetensors, or a .ckpt in the original layout ({"state_dict": ...})."""
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path


def unpacked_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict as it was before pack_weights (sd/models/layers.py), which the CPU may have chosen
    (sd/kernels.py): packed weights in their plain layout, and those the U-Net's feed-forward and upsampling layers
    keep packed apart under their original names (the upsampling's 3x3 kernel unfolded, to fp32 rounding)."""
    from sd.models.layers import Upsample
    from sd.models.unet import GEGLU

    state = {key: value.to_dense() if value.is_mkldnn else value for key, value in model.state_dict().items()}
    for name, layer in model.named_modules():
        if isinstance(layer, GEGLU) and layer.packed is not None:
            hidden, hidden_bias, gate, gate_bias = layer.packed
            state[f"{name}.proj_in.weight"] = torch.cat([hidden.to_dense(), gate.to_dense()])
            state[f"{name}.proj_in.bias"] = torch.cat([hidden_bias, gate_bias])
        elif isinstance(layer, Upsample) and layer.packed is not None:
            bias = layer.packed[1]
            state[f"{name}.conv.weight"] = layer.unfolded_kernel().to(bias.dtype)
            state[f"{name}.conv.bias"] = bias
    return state
