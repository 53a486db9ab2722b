"""Our models give the numbers of the reference implementations on the same full-size weights.

One random SD 1.5 checkpoint with the original key names feeds both sides: ours through
`load_models`, diffusers' through its own single-file converters, transformers' CLIP through
the checkpoint's own names. Every model is full size (1.07 B parameters); inputs are small.
Each reference uses its plain (non-fused) attention, so the comparison also checks our use of
`scaled_dot_product_attention`.

Tolerance: max |ours - reference| <= 1e-4 * max |reference|. Both sides compute in float32 with
differently ordered sums (fused q/k/v, other kernels); through some 70 layers such rounding
differences grow to about 1e-6 of the output's scale, so 1e-4 leaves room without hiding any
real mistake (a wrong norm epsilon or a swapped projection gives errors of order 1e-2 to 1).
"""

import gc

import torch
from checkpoints import unpacked_state_dict
from reference import reference_clip, reference_unet

from sd import load_models

RELATIVE_TOLERANCE = 1e-4


def assert_close(ours: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    assert ours.shape == reference.shape
    assert torch.isfinite(reference).all()
    scale = reference.abs().max().item()
    error = (ours - reference).abs().max().item()
    print(f"{what}: max abs diff {error:.3g}, reference max abs {scale:.3g}, ratio {error / scale:.3g}")
    assert error <= RELATIVE_TOLERANCE * scale, f"{what}: {error} > {RELATIVE_TOLERANCE} * {scale}"


def test_unet_matches_diffusers(models, safetensors_checkpoint):
    reference = reference_unet(safetensors_checkpoint)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 77, 768, generator=generator)
    timesteps = torch.tensor([981, 1])
    with torch.no_grad():
        expected = reference(latents, timesteps, encoder_hidden_states=context).sample
        actual = models["diffusion"](latents, context, timesteps)
        # An int time step is the same for the whole batch.
        actual_int = models["diffusion"](latents[:1], context[:1], 981)
    del reference
    gc.collect()
    assert_close(actual, expected, "U-Net")
    assert_close(actual_int, expected[:1], "U-Net (int timestep)")


def test_vae_encoder_matches_diffusers(models, vae):
    generator = torch.Generator().manual_seed(2)
    image = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        posterior = vae.encode(image).latent_dist
        # The same sample as ours: mean + std * the injected noise, then the SD 1.5 scale factor.
        expected = (posterior.mean + posterior.std * noise) * vae.config.scaling_factor
        actual = models["encoder"](image, noise)
    assert vae.config.scaling_factor == 0.18215
    assert_close(actual, expected, "VAE encoder")


def test_vae_decoder_matches_diffusers(models, vae):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = vae.decode(latents / vae.config.scaling_factor).sample
        actual = models["decoder"](latents)
    assert_close(actual, expected, "VAE decoder")


def test_clip_matches_transformers(models, safetensors_checkpoint):
    reference = reference_clip(safetensors_checkpoint)
    generator = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 49406, (2, 77), generator=generator)
    tokens[:, 0] = 49406
    tokens[0, 10:] = 49407
    with torch.no_grad():
        expected = reference(input_ids=tokens).last_hidden_state
        actual = models["clip"](tokens)
    assert_close(actual, expected, "CLIP")


def test_ckpt_and_safetensors_load_the_same_weights(models, ckpt_checkpoint):
    from_ckpt = load_models(ckpt_checkpoint)
    for name, model in models.items():
        theirs = unpacked_state_dict(from_ckpt[name])
        for key, value in unpacked_state_dict(model).items():
            assert torch.equal(value, theirs[key]), f"{name}.{key}"


def test_half_precision_checkpoint_loads_into_any_dtype(safetensors_checkpoint, tmp_path):
    """fp16 and bf16 checkpoints (as most downloads are) load into fp32 and bf16 models. The U-Net and the
    decoder hold `dtype`; on a CPU the text and image encoders keep the file's tensors, but for their fused
    q/k/v projections, and compute in whatever dtype they are asked for."""
    from safetensors.torch import load_file

    from checkpoints import write_checkpoint

    full = load_file(safetensors_checkpoint)  # the session's random weights, cast: faster than drawing new ones
    for stored in (torch.float16, torch.bfloat16):
        weights = {name: value.to(stored) if value.dtype == torch.float32 else value for name, value in full.items()}
        path = write_checkpoint(weights, tmp_path / f"half-{stored}.safetensors")
        del weights
        for target in (torch.float32, torch.bfloat16):
            models = load_models(path, dtype=target)
            for name in ("diffusion", "decoder"):
                assert {p.dtype for p in models[name].parameters()} == {target}
            for name in ("clip", "encoder"):
                fused = {id(p) for key, p in models[name].named_parameters() if ".in_proj." in key}
                assert {p.dtype for p in models[name].parameters() if id(p) not in fused} == {stored}
                assert len(models[name].mapped_parameters) == len(list(models[name].parameters())) - len(fused)
            with torch.inference_mode():
                assert models["clip"](torch.zeros(1, 77, dtype=torch.long), target).dtype == target
            del models
        path.unlink()
