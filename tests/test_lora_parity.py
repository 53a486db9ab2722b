"""LoRA merged as diffusers merges it: a random kohya LoRA/LoCon file over every layer a LoRA can change in SD 1.5
(text encoder q/k/v/out_proj/fc1/fc2; U-Net attention q/k/v/out, feed-forward, proj_in/proj_out, the residual
blocks' 3x3 convolutions, time-embedding projections and 1x1 shortcuts, the down- and upsamplers' convolutions,
conv_in, conv_out and the time embedding), with alpha != rank, against
diffusers' `load_lora_weights` + `fuse_lora` (peft), one fuse per component so that the text encoder and the
U-Net get their own multipliers, as A1111's <lora:NAME:TE:UNET> gives them. On the random full-size checkpoint.
Every module has its alpha: diffusers gives a module without one the file's most common alpha, where kohya and
A1111 take alpha = rank (scale 1); test_lora.py checks that case against the formula.

Tolerances: the merged weights agree to 1e-6 relative (both add multiplier * alpha / rank * up @ down to the
fp32 weight; the products round in another order); the render to 1/255 per pixel (see test_pipeline_parity).
"""

import gc

import numpy as np
import pytest
import torch
from reference import reference_pipeline
from safetensors.torch import save_file
from test_pipeline_parity import SD15_SCHEDULER, assert_same_image

from sd import generate, load_models
from sd.files.lora import LoraLibrary, LoraTag, read_lora
from sd.files.lora_merge import dense_weight, lora_sites, merged, plan_changes

RANK, ALPHA = 4, 3.0
TE, UNET = 0.6, 0.9


def random_kohya_lora(sites: dict, seed: int = 0, rank: int = RANK) -> dict[str, torch.Tensor]:
    """A kohya LoRA/LoCon file's tensors over `sites`: 3x3 convolutions get a 3x3 down and a 1x1 up, as LoCon
    writes them. Changes of about a quarter of the random weights' spread (0.02)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, site in sites.items():
        out, inputs, *kernel = site.shape
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, inputs, *kernel, generator=generator) * 0.04
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, rank, *[1] * len(kernel), generator=generator) * 0.04
        tensors[f"{name}.alpha"] = torch.tensor(ALPHA)
    return tensors


@pytest.fixture(scope="module")
def both(safetensors_checkpoint, tmp_path_factory):
    """Our models, and diffusers' pipeline with the random LoRA fused (text encoder at TE, U-Net at UNET)."""
    from diffusers import DDPMScheduler

    ours = load_models(safetensors_checkpoint)
    folder = tmp_path_factory.mktemp("lora")
    save_file(random_kohya_lora(lora_sites(ours)), folder / "every-layer.safetensors")
    reference = reference_pipeline(safetensors_checkpoint, DDPMScheduler.from_config(SD15_SCHEDULER))
    reference.load_lora_weights(str(folder / "every-layer.safetensors"), adapter_name="every-layer")
    reference.fuse_lora(components=["text_encoder"], lora_scale=TE, adapter_names=["every-layer"])
    reference.fuse_lora(components=["unet"], lora_scale=UNET, adapter_names=["every-layer"])
    reference.unload_lora_weights()
    yield ours, reference, LoraLibrary(folder)
    del ours, reference
    gc.collect()


def test_merged_weights_equal_diffusers_fused_lora(both):
    ours, reference, library = both
    lora = read_lora("every-layer", library["every-layer"])
    changes = plan_changes(ours, [(LoraTag("every-layer", TE, UNET), lora)])
    expected_state = {"clip": reference.text_encoder.state_dict(), "diffusion": reference.unet.state_dict()}
    worst = {}
    with torch.inference_mode(), merged(changes["clip"]), merged(changes["diffusion"]):
        for name, site in lora_sites(ours).items():
            actual = dense_weight(site.layer)
            actual = actual[site.rows] if site.rows is not None else actual
            reference_name = site.name.removeprefix("text_model.") if site.model == "clip" else site.name
            expected = expected_state[site.model][reference_name + ".weight"].float()
            error = ((actual - expected).abs().max() / expected.abs().max()).item()
            worst[site.model] = max(worst.get(site.model, 0.0), error)
            assert error < 1e-6, (name, error)
    print(f"max relative error of the merged weights: text encoder {worst['clip']:.1e}, U-Net {worst['diffusion']:.1e}")


def test_render_with_a_lora_equals_diffusers_with_it_fused(both):
    ours, reference, library = both
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    prompt, negative = "a photograph of an astronaut riding a horse", "blurry"
    expected = reference(
        prompt=prompt, negative_prompt=negative, num_inference_steps=2, guidance_scale=7.5, height=64, width=64,
        latents=latents.clone(), generator=torch.Generator().manual_seed(5), output_type="np",
    ).images[0]
    actual = generate(f"a photograph of <lora:every-layer:{TE}:{UNET}>an astronaut riding a horse", negative_prompt=negative, steps=2,
                      cfg_scale=7.5, width=64, height=64, seed=5, latents=latents, models=ours, loras=library, progress=False)[0]
    assert_same_image(actual, expected, "LoRA pipeline")
    without = generate(prompt, negative_prompt=negative, steps=2, cfg_scale=7.5, width=64, height=64, seed=5, latents=latents,
                       models=ours, loras=library, progress=False)[0]
    assert np.abs(np.asarray(without, dtype=int) - np.asarray(actual, dtype=int)).max() > 10  # the LoRA shows
