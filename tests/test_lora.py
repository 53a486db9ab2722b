"""LoRA and LyCORIS: the prompt's tags (sd/files/lora.py), each kind of module merged into the demo model's layers as its
formula says (sd/files/lora_merge.py), the weights put back exactly after a render, A1111's Lora hashes, and the
command's errors. The merge of kohya LoRA/LoCon files is compared with diffusers' in test_lora_parity.py.

The formulas below are written from LyCORIS' and A1111's descriptions (a1111-formats.md section 4), in fp64; our
merge adds the change to the fp32 weight in fp32, so they agree to fp32 rounding: 1e-6 relative.
"""

import hashlib
import logging
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

import cli
from sd import Settings, generate, load_models
from sd.files import hashes, lora_merge
from sd.errors import SDError
from sd.files.lora import LoraLibrary, LoraTag, read_lora, split_tags
from sd.files.lora_merge import dense_weight, lora_sites, merged, plan_changes
from sd.kernels import X86_ONEDNN
from sd.models.layers import Conv2d, Upsample, pack_weights
from sd.pipeline import DEMO_CHECKPOINT
from sd.prompts.editing import Timeline
from sd.prompts.conditioning import encode_prompt, guidance_contexts
from sd.settings import read_infotext
from test_embeddings import RunsCode

LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # (48, 64)
QUERY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # rows 0-47 of the fused (144, 48)
CONVOLUTION = "lora_unet_down_blocks_0_resnets_0_conv1"  # (48, 48, 3, 3)
TEXT = "lora_te_text_model_encoder_layers_0_mlp_fc1"  # (256, 64)


def randn(*shape, seed: int = 0, spread: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * spread


# Tags


@pytest.mark.parametrize("prompt, text, tags", [
    ("a cat <lora:film:0.8>", "a cat ", [LoraTag("film", 0.8, 0.8)]),
    ("<lora:film>a cat", "a cat", [LoraTag("film")]),
    ("a <lora:film:0.5:0.9> cat", "a  cat", [LoraTag("film", 0.5, 0.9)]),
    ("a cat <lora:film:unet=0.3>", "a cat ", [LoraTag("film", 1.0, 0.3)]),
    ("a cat <lora:film:0.7:te=0.2>", "a cat ", [LoraTag("film", 0.2, 0.2)]),  # unet defaults to te once te= has set it, as A1111
    ("<lyco:film:0.5:1:8>(a cat:1.2)<lora:ink-2:-1>", "(a cat:1.2)", [LoraTag("film", 0.5, 1.0, 8), LoraTag("ink-2", -1.0, -1.0)]),
    ("a <cat> 1:2 <a cat:1>", "a <cat> 1:2 <a cat:1>", []),  # not tags: a tag is <word:arguments>
])
def test_tags_are_cut_and_read_as_a1111_reads_them(prompt, text, tags):
    assert split_tags(prompt) == (text, tags)


def test_other_networks_tags_are_cut_with_a_warning_and_bad_tags_refused(demo, caplog):
    assert split_tags("a cat <hypernet:anime:1>") == ("a cat ", [])
    with caplog.at_level(logging.WARNING, logger="sd"):
        generate("a red circle <hypernet:anime:1>", models=demo, steps=1, seed=0, progress=False)
    assert caplog.text.count("ignored <hypernet:anime:1> in the prompt: sd has no hypernet networks") == 1
    for bad in ("<lora:film:strong>", "<lora:film:weight=1>"):
        with pytest.raises(SDError, match="write <lora:NAME:MULTIPLIER>|must be finite numbers"):
            Settings(f"a cat {bad}")
    for bad in ("<lora:film:nan>", "<lora:film:1:inf>", "<lora:film:te=-inf>"):
        with pytest.raises(SDError, match=f"^{re.escape(bad)}: the multipliers must be finite numbers and dyn a whole number$"):
            Settings(f"a cat {bad}")


def test_the_prompt_loses_its_tags_before_clip_the_negative_prompt_keeps_them(demo):
    """As A1111: tags are cut from the prompt only; in the negative prompt they are text."""
    settings = Settings("a red circle <lora:film:0.5>", negative_prompt="blurry <lora:film:0.5>")
    with torch.inference_mode():
        (contexts,), _ = guidance_contexts(demo, settings, 1, True, [Timeline(2)])
        negative, prompt = contexts(0).chunk(2)
        assert torch.equal(prompt, encode_prompt(demo, "a red circle "))
        assert torch.equal(negative, encode_prompt(demo, "blurry <lora:film:0.5>"))


# Each kind of module, merged as its formula says


def merged_weights(models, tensors: dict, tag: LoraTag, folder: Path, names: list[str], biases: list | None = None) -> list[torch.Tensor]:
    """The weights of the `names` layers with the file of `tensors` merged, and their originals; the merged biases
    of the layers `biases` are appended to that list."""
    save_file(tensors, folder / f"{tag.name}.safetensors")
    lora = read_lora(tag.name, folder / f"{tag.name}.safetensors")
    sites = lora_sites(models)
    changes = plan_changes(models, [(tag, lora)])

    def weights():
        return [part(dense_weight(sites[name].layer), sites[name]).double() for name in names]

    before = weights()
    with torch.inference_mode(), merged(changes["clip"]), merged(changes["diffusion"]):
        after = weights()
        if biases:
            biases[:] = [layer.bias.double() for layer in biases]
    assert all(torch.equal(a, b) for a, b in zip(before, weights()))  # put back
    return after, before


def part(weight: torch.Tensor, site) -> torch.Tensor:
    return weight[site.rows] if site.rows is not None else weight


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-6) -> None:
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error < tolerance, error


def test_lora_and_locon_alpha_over_rank_and_without_alpha(demo, tmp_path):
    down, up = randn(4, 64, seed=1), randn(48, 4, seed=2)
    conv_down, conv_up = randn(2, 48, 3, 3, seed=3), randn(48, 2, 1, 1, seed=4)
    query_down, query_up = randn(3, 48, seed=5), randn(48, 3, seed=6)
    tensors = {f"{LINEAR}.lora_down.weight": down, f"{LINEAR}.lora_up.weight": up, f"{LINEAR}.alpha": torch.tensor(1.0),
               f"{CONVOLUTION}.lora_down.weight": conv_down, f"{CONVOLUTION}.lora_up.weight": conv_up,  # no alpha: scale 1
               f"{QUERY}.lora_down.weight": query_down, f"{QUERY}.lora_up.weight": query_up, f"{QUERY}.alpha": torch.tensor(6.0)}
    (linear, convolution, query), (w1, w2, w3) = merged_weights(demo, tensors, LoraTag("locon", 1.0, 0.7), tmp_path, [LINEAR, CONVOLUTION, QUERY])
    assert_close(linear, w1 + 0.7 * 1.0 / 4 * (up @ down).double())
    # (48, 2) @ (2, 48 * 9) -> (48, 48, 3, 3)
    assert_close(convolution, w2 + 0.7 * (conv_up.flatten(1) @ conv_down.flatten(1)).reshape(48, 48, 3, 3).double())
    assert_close(query, w3 + 0.7 * 6.0 / 3 * (query_up @ query_down).double())


def test_locon_cp_decomposition_and_dyn(demo, tmp_path):
    up, mid, down = randn(48, 4, 1, 1, seed=1), randn(4, 4, 3, 3, seed=2), randn(4, 48, 1, 1, seed=3)
    tensors = {f"{CONVOLUTION}.lora_up.weight": up, f"{CONVOLUTION}.lora_mid.weight": mid, f"{CONVOLUTION}.lora_down.weight": down,
               f"{CONVOLUTION}.alpha": torch.tensor(2.0)}
    (convolution,), (weight,) = merged_weights(demo, tensors, LoraTag("cp", 1.0, 1.0), tmp_path, [CONVOLUTION])
    # out <- up <- mid (3x3) <- down <- in
    expected = torch.einsum("or,rskl,si->oikl", up[:, :, 0, 0].double(), mid.double(), down[:, :, 0, 0].double())
    assert_close(convolution, weight + 2.0 / 4 * expected)

    down, up = randn(8, 64, seed=4), randn(48, 8, seed=5)
    tensors = {f"{LINEAR}.lora_down.weight": down, f"{LINEAR}.lora_up.weight": up, f"{LINEAR}.alpha": torch.tensor(8.0)}
    (linear,), (weight,) = merged_weights(demo, tensors, LoraTag("dyn", 1.0, 1.0, dyn=3), tmp_path, [LINEAR])
    assert_close(linear, weight + 8.0 / 8 * (up[:, :3] @ down[:3]).double())  # A1111's dyn: the first 3 ranks, alpha / 8 kept


def test_loha(demo, tmp_path):
    w1a, w1b, w2a, w2b = randn(48, 4, seed=1), randn(4, 64, seed=2), randn(48, 4, seed=3), randn(4, 64, seed=4)
    c1a, c1b, c2a, c2b = randn(48, 2, seed=5), randn(2, 48, 3, 3, seed=6), randn(48, 2, seed=7), randn(2, 48, 3, 3, seed=8)
    tensors = {f"{LINEAR}.hada_w1_a": w1a, f"{LINEAR}.hada_w1_b": w1b, f"{LINEAR}.hada_w2_a": w2a, f"{LINEAR}.hada_w2_b": w2b,
               f"{LINEAR}.alpha": torch.tensor(2.0),
               f"{CONVOLUTION}.hada_w1_a": c1a, f"{CONVOLUTION}.hada_w1_b": c1b, f"{CONVOLUTION}.hada_w2_a": c2a,
               f"{CONVOLUTION}.hada_w2_b": c2b, f"{CONVOLUTION}.alpha": torch.tensor(1.0)}
    (linear, convolution), (w1, w2) = merged_weights(demo, tensors, LoraTag("loha", 1.0, 0.5), tmp_path, [LINEAR, CONVOLUTION])
    # dW = (w1_a @ w1_b) * (w2_a @ w2_b), elementwise; scale alpha / w1_b's rank
    assert_close(linear, w1 + 0.5 * 2.0 / 4 * ((w1a @ w1b) * (w2a @ w2b)).double())
    product = (c1a @ c1b.flatten(1)) * (c2a @ c2b.flatten(1))  # (48, 48 * 9)
    assert_close(convolution, w2 + 0.5 * 1.0 / 2 * product.reshape(48, 48, 3, 3).double())


def test_lokr(demo, tmp_path):
    w1, w2a, w2b = randn(4, 8, seed=1), randn(12, 2, seed=2), randn(2, 8, seed=3)  # kron((4, 8), (12, 8)) = (48, 64)
    c1, c2 = randn(4, 4, seed=4), randn(12, 12, 3, 3, seed=5)  # kron((4, 4, 1, 1), (12, 12, 3, 3)) = (48, 48, 3, 3)
    tensors = {f"{LINEAR}.lokr_w1": w1, f"{LINEAR}.lokr_w2_a": w2a, f"{LINEAR}.lokr_w2_b": w2b, f"{LINEAR}.alpha": torch.tensor(1.0),
               f"{CONVOLUTION}.lokr_w1": c1, f"{CONVOLUTION}.lokr_w2": c2, f"{CONVOLUTION}.alpha": torch.tensor(5.0)}
    (linear, convolution), (w_linear, w_convolution) = merged_weights(demo, tensors, LoraTag("lokr", 1.0, 0.8), tmp_path, [LINEAR, CONVOLUTION])
    # rank from the factored w2: alpha / 2
    assert_close(linear, w_linear + 0.8 * 1.0 / 2 * torch.kron(w1.double(), (w2a @ w2b).double()))
    # both factors whole: no rank, scale 1 whatever alpha says
    expected = torch.einsum("ab,cdkl->acbdkl", c1.double(), c2.double()).reshape(48, 48, 3, 3)  # the Kronecker product, by hand
    assert_close(convolution, w_convolution + 0.8 * expected)


def test_dora_and_full_modules(demo, tmp_path):
    down, up, magnitude = randn(4, 64, seed=1), randn(48, 4, seed=2), 0.5 + randn(48, 1, seed=3).abs()
    diff, diff_bias = randn(256, 64, seed=4), randn(256, seed=5)
    tensors = {f"{LINEAR}.lora_down.weight": down, f"{LINEAR}.lora_up.weight": up, f"{LINEAR}.alpha": torch.tensor(2.0),
               f"{LINEAR}.dora_scale": magnitude, f"{TEXT}.diff": diff, f"{TEXT}.diff_b": diff_bias}
    fc1 = demo["clip"].layers[0].fc1
    bias, biases = fc1.bias.double(), [fc1]
    (linear, text), (w_linear, w_text) = merged_weights(demo, tensors, LoraTag("dora", 0.3, 0.6), tmp_path, [LINEAR, TEXT], biases)
    # DoRA: W' = m * (W + s dW) / ||W + s dW|| over each output's row (dora_scale (out, 1)); the multiplier scales W' - W
    changed = w_linear + 2.0 / 4 * (up @ down).double()
    decomposed = magnitude.double() * changed / changed.norm(dim=1, keepdim=True)
    assert_close(linear, w_linear + 0.6 * (decomposed - w_linear))
    # the text encoder's multiplier; the demo's text encoder keeps the file's fp16 weights, so the merged weight
    # is rounded to fp16: half an fp16 step, 2^-11 relative
    fp16_rounding = 2**-11
    assert_close(text, w_text + 0.3 * diff.double(), fp16_rounding)
    assert_close(biases[0], bias + 0.3 * diff_bias.double(), fp16_rounding)
    assert torch.equal(fc1.bias.double(), bias)  # put back


def test_alpha_zero_changes_nothing_as_in_a1111(demo, tmp_path, caplog):
    tensors = {f"{LINEAR}.lora_down.weight": randn(4, 64), f"{LINEAR}.lora_up.weight": randn(48, 4), f"{LINEAR}.alpha": torch.tensor(0.0)}
    with caplog.at_level(logging.WARNING, logger="sd"):
        (linear,), (weight,) = merged_weights(demo, tensors, LoraTag("zero", 1.0, 1.0), tmp_path, [LINEAR])
    assert torch.equal(linear, weight)  # A1111: alpha / rank = 0 (kohya would train it at scale 1)
    assert "LoRA zero has modules with alpha 0, which change nothing" in caplog.text


def test_diffusers_and_peft_names_read_as_kohya_names(demo, tmp_path):
    down, up = randn(4, 64, seed=1), randn(48, 4, seed=2)
    text_down, text_up = randn(4, 64, seed=3), randn(256, 4, seed=4)
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    kohya = {f"{LINEAR}.lora_down.weight": down, f"{LINEAR}.lora_up.weight": up, f"{TEXT}.lora_down.weight": text_down,
             f"{TEXT}.lora_up.weight": text_up}
    peft = {f"unet.{module}.lora_A.weight": down, f"unet.{module}.lora_B.weight": up,
            "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": text_down,
            "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": text_up}
    old_diffusers = {f"unet.{module.replace('attn2.to_k', 'attn2.processor.to_k_lora')}.down.weight": down,
                     f"unet.{module.replace('attn2.to_k', 'attn2.processor.to_k_lora')}.up.weight": up,
                     "text_encoder.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": text_down,
                     "text_encoder.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": text_up}
    expected, _ = merged_weights(demo, kohya, LoraTag("kohya", 0.5, 0.5), tmp_path, [LINEAR, TEXT])
    for name, tensors in (("peft", peft), ("old-diffusers", old_diffusers)):
        actual, _ = merged_weights(demo, tensors, LoraTag(name, 0.5, 0.5), tmp_path, [LINEAR, TEXT])
        assert all(torch.equal(a, e) for a, e in zip(actual, expected)), name


def test_a_lora_for_sd2_is_refused_by_its_width_and_the_weights_stay(demo, tmp_path):
    """SD 2.x LoRAs have SD 1.5's module names (diffusers' U-Net and kohya's lora_te_ text encoder) but a 1024-wide
    text: the shapes tell."""
    save_file({f"{TEXT}.lora_down.weight": randn(4, 1024), f"{TEXT}.lora_up.weight": randn(256, 4),
               f"{LINEAR}.lora_down.weight": randn(4, 64), f"{LINEAR}.lora_up.weight": randn(48, 4)}, tmp_path / "sd2.safetensors")
    before = {name: value.clone() for name, value in demo["clip"].state_dict().items()}
    with pytest.raises(SDError, match=f"LoRA module {TEXT} does not fit SD 1.5's layer of shape \\(256, 64\\): its input is 1024 wide, an SD 2.x LoRA"):
        generate("a red circle <lora:sd2>", models=demo, loras=LoraLibrary(tmp_path), steps=1, seed=0, progress=False)
    assert all(torch.equal(value, before[name]) for name, value in demo["clip"].state_dict().items())


# Renders: the weights put back


def demo_lora(sites: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoCon file over every layer of the demo model."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, site in sites.items():
        out, inputs, *kernel = site.shape
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, inputs, *kernel, generator=generator) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, 4, *[1] * len(kernel), generator=generator) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    return tensors


def all_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight, plain: the parameters and the packed layers' tensors (sd/models/layers.py, pack_weights)."""
    weights = dict(model.named_parameters())
    for name, layer in model.named_modules():
        packed = getattr(layer, "packed", None)
        if packed is not None:
            flat = [tensor for item in packed for tensor in (item if isinstance(item, list) else [item])]
            weights.update((f"{name}.packed.{i}", tensor) for i, tensor in enumerate(flat))
    return {name: tensor.to_dense() if tensor.is_mkldnn else tensor for name, tensor in weights.items()}


@pytest.mark.parametrize("dtype, hires_scale, packing", [(torch.float32, 1.5, None), (torch.bfloat16, None, None), (torch.float32, 1.5, "sizes")])
def test_after_a_render_with_loras_the_next_is_that_of_a_fresh_load(tmp_path, monkeypatch, dtype, hires_scale, packing):
    """On a CPU with bf16 instructions, the bf16 U-Net and decoder are packed for oneDNN (sd/models/layers.py): their
    merged layers are packed again, and the packed originals put back. Hires fix runs the U-Net twice (in fp32
    only: new sizes cost a bf16 render seconds of oneDNN's set-up). With kernels packed per input size (forced, as
    an AVX2 CPU chooses), the merged ones are packed again at each size, and so are those put back."""
    if packing is not None:
        if not X86_ONEDNN:
            pytest.skip("packing is for oneDNN on x86")
        monkeypatch.setenv("SD_KERNELS", f"packing={packing}")
    models, fresh = load_models(DEMO_CHECKPOINT, dtype=dtype), load_models(DEMO_CHECKPOINT, dtype=dtype)
    sites = lora_sites(models)
    save_file(demo_lora(sites, seed=1), tmp_path / "one.safetensors")
    save_file(demo_lora(sites, seed=2), tmp_path / "two.safetensors")
    options = dict(steps=1, seed=3, progress=False, loras=LoraLibrary(tmp_path), hires_scale=hires_scale, hires_steps=1)
    with_loras = generate("a red circle <lora:one:0.8> <lora:two:0.5:1.2>", models=models, **options)[0]
    for name in ("clip", "diffusion"):
        ours, theirs = all_weights(models[name]), all_weights(fresh[name])
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours), name
    after = generate("a red circle", models=models, **options)[0]
    from_fresh = generate("a red circle", models=fresh, **options)[0]
    assert np.array_equal(np.asarray(after), np.asarray(from_fresh))
    if packing == "sizes":  # the last pass's shape (hires fix's 96x96 image: 12x12 latents, guided: 2 of them)
        assert (2, 4, 12, 12) in {getattr(layer.weight, "packed_for", None) for layer in models["diffusion"].modules() if isinstance(layer, Conv2d)}
    assert np.abs(np.asarray(with_loras, dtype=int) - np.asarray(from_fresh, dtype=int)).max() > 10


@pytest.mark.skipif(not X86_ONEDNN, reason="packing is for oneDNN on x86")
def test_a_kernel_packed_for_an_input_size_is_merged_packed_for_that_size():
    """Under packing per input size (sd/kernels.py's `sizes`), a merged convolution kernel, and an upsampling layer's
    merged folded kernels, are packed for the input shape the originals were packed for, so that the next call does
    not pack them again; and they compute the merged layer's sums (fp32: the same sums in another order, within 1e-5 of
    the largest value; either change left out: 0.41-0.54)."""
    generator = torch.Generator().manual_seed(0)
    conv, upsample = Conv2d(8, 8, 3, padding=1), Upsample(8)
    layers = torch.nn.Sequential(conv, upsample).requires_grad_(False)
    for parameter in layers.parameters():
        parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    kernel, upsample_kernel, upsample_bias = conv.weight.clone(), upsample.conv.weight.clone(), upsample.conv.bias.clone()
    x = torch.randn(1, 8, 5, 6, generator=generator)
    changes = [torch.randn(8, 8, 3, 3, generator=generator) * 0.1 for _ in range(2)]
    pack_weights(layers, per_size=True)
    with torch.inference_mode():
        layers(x)  # packs each layer for its input: (1, 8, 5, 6)
        lora_merge.merge_plain(conv, kernel + changes[0], None)
        lora_merge.merge_upsample(upsample, changes[1], None)
        assert conv.weight.packed_for == (1, 8, 5, 6) and all(k.packed_for == (1, 8, 5, 6) for k in upsample.packed[0])
        merged_weight, merged_kernels = conv.weight, upsample.packed[0]
        out = layers(x)
        assert conv.weight is merged_weight and upsample.packed[0] is merged_kernels  # not packed again
    middle = F.conv2d(x, kernel + changes[0], conv.bias, padding=1)
    expected = F.conv2d(F.interpolate(middle, scale_factor=2.0, mode="nearest"), upsample_kernel + changes[1], upsample_bias, padding=1)
    assert_close(out, expected, 1e-5)


def test_hires_fix_merges_each_layer_once_for_both_passes(tmp_path, monkeypatch):
    """Both passes of hires fix render with the LoRA (the image equals one with the same changes merged by hand
    around the whole render), and each changed layer is merged once per render, not once per pass."""
    models = load_models(DEMO_CHECKPOINT, dtype=torch.float32)
    save_file(demo_lora(lora_sites(models), seed=1), tmp_path / "one.safetensors")
    library = LoraLibrary(tmp_path)
    options = dict(steps=1, seed=3, progress=False, loras=library, hires_scale=1.5, hires_steps=1)
    merges = Counter()
    merge = lora_merge.merge
    monkeypatch.setattr(lora_merge, "merge", lambda layer, *args: (merges.update([layer]), merge(layer, *args)))
    tagged = generate("a red circle <lora:one:0.8>", models=models, **options)[0]
    monkeypatch.undo()
    changes = plan_changes(models, [(LoraTag("one", 0.8, 0.8), read_lora("one", library["one"]))])
    assert merges.keys() == changes["clip"].keys() | changes["diffusion"].keys() and set(merges.values()) == {1}
    with merged(changes["clip"]), merged(changes["diffusion"]):
        by_hand = generate("a red circle", models=models, **options)[0]
    assert np.array_equal(np.asarray(tagged), np.asarray(by_hand))


# Hashes and the infotext


def test_lora_hash_is_sshs_model_hash_else_the_sha256_of_the_tensor_data(tmp_path, monkeypatch):
    monkeypatch.setenv("SD_CACHE_DIR", str(tmp_path / "cache"))
    tensors = {f"{LINEAR}.lora_down.weight": randn(4, 64), f"{LINEAR}.lora_up.weight": randn(48, 4)}
    save_file(tensors, tmp_path / "plain.safetensors", metadata={"ss_output_name": "plain"})
    data = (tmp_path / "plain.safetensors").read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    expected = hashlib.sha256(data[header:]).hexdigest()[:12]
    assert read_lora("plain", tmp_path / "plain.safetensors").short_hash == expected
    # other metadata, the same tensors: the same hash (A1111's addnet hash)
    save_file(tensors, tmp_path / "edited.safetensors", metadata={"ss_output_name": "renamed", "notes": "x" * 100})
    assert read_lora("edited", tmp_path / "edited.safetensors").short_hash == expected
    assert hashes.cached_sha256(tmp_path / "plain.safetensors", "tensor_sha256") == hashlib.sha256(data[header:]).hexdigest()
    save_file(tensors, tmp_path / "kohya.safetensors", metadata={"sshs_model_hash": "0123456789abcdef" * 4})
    assert read_lora("kohya", tmp_path / "kohya.safetensors").short_hash == "0123456789ab"
    torch.save(tensors, tmp_path / "pickled.pt")
    assert read_lora("pickled", tmp_path / "pickled.pt").short_hash == hashlib.sha256((tmp_path / "pickled.pt").read_bytes()).hexdigest()[:12]


def test_lora_hashes_are_written_and_read_as_a1111_does(demo, tmp_path, monkeypatch):
    monkeypatch.setenv("SD_CACHE_DIR", str(tmp_path / "cache"))
    save_file(demo_lora(lora_sites(demo)), tmp_path / "style.safetensors", metadata={"sshs_model_hash": "c" * 64})
    image, = generate("a red circle <lora:style:0.6>", models=demo, loras=LoraLibrary(tmp_path), steps=1, seed=0, progress=False)
    made = image.info["sd"]
    assert made.prompt == "a red circle <lora:style:0.6>" and made.lora_hashes == {"style": "cccccccccccc"}
    assert 'Lora hashes: "style: cccccccccccc"' in made.to_infotext()
    read = read_infotext(made.to_infotext())
    assert read.settings == made and read.ignored == []
    a1111 = 'a <lora:add_detail:1> photo\nSteps: 20, Sampler: Euler a, Seed: 1, Lora hashes: "add_detail: 7c6bad76eb54, film v2: 1c2d3e4f5a6b", Version: v1.10.1'
    assert Settings.from_infotext(a1111).lora_hashes == {"add_detail": "7c6bad76eb54", "film v2": "1c2d3e4f5a6b"}
    assert Settings.from_infotext(a1111).prompt == "a <lora:add_detail:1> photo"
    assert Settings("a", lora_hashes={"x:y,z": "0" * 12}).to_infotext().endswith('Lora hashes: "xyz: 000000000000"')


# The command


def sd(*args):
    return CliRunner().invoke(cli.main, list(map(str, args)), prog_name="sd")


def write_sdxl_lora(path: Path) -> None:
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": randn(4, 768),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": randn(3072, 4),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": randn(4, 2048),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": randn(640, 4)}, path)


def write_truncated(path: Path) -> None:
    save_file({f"{LINEAR}.lora_down.weight": randn(4, 64), f"{LINEAR}.lora_up.weight": randn(48, 4)}, path)
    path.write_bytes(path.read_bytes()[:-100])


def write_pickled_callable(path: Path) -> None:
    torch.save({f"{LINEAR}.lora_down.weight": randn(4, 64), "payload": RunsCode(path.parent / "code-ran")}, path)


@pytest.mark.parametrize("name, write, message", [
    ("sdxl.safetensors", write_sdxl_lora, "error: LoRA sdxl: lora_te1_text_model_encoder_layers_0_mlp_fc1 is no layer of SD 1.5: it is an SDXL LoRA"),
    ("cut.safetensors", write_truncated, "error: cannot read LoRA loras/cut.safetensors: the file is truncated"),
    ("code.pt", write_pickled_callable, "error: refusing loras/code.pt: it would call posix.mkdir, and a LoRA file must hold only tensors"),
    ("missing.safetensors", lambda path: None, "error: LoRA 'missing' not found in loras: put missing.safetensors there"),
])
def test_bad_loras_are_one_line_exit_2_before_sampling(command_environment, name, write, message):
    Path("loras").mkdir()
    write(Path("loras") / name)
    result = sd("generate", "--prompt", f"a red circle <lora:{Path(name).stem}>", "--lora-dir", "loras", "--checkpoint", "demo",
                "--steps", "1", "--output", "a.png")
    assert result.exit_code == 2 and result.output.startswith(message) and len(result.output.strip().splitlines()) == 1, result.output
    assert not Path("a.png").exists() and not Path("loras/code-ran").exists()


def test_the_command_takes_lora_files_and_tags_and_reads_them_back(command_environment):
    demo = load_models(DEMO_CHECKPOINT)
    Path("loras").mkdir()
    save_file(demo_lora(lora_sites(demo), seed=1), "loras/ink.safetensors")
    save_file(demo_lora(lora_sites(demo), seed=2), "film.safetensors")
    wrong = sd("generate", "--prompt", "a red circle", "--lora", "film.safetensors:strong", "--checkpoint", "demo", "--output", "a.png")
    assert wrong.exit_code == 2 and wrong.output == "error: --lora film.safetensors:strong: the multiplier 'strong' is not a number: give film.safetensors:0.8, say\n"
    made = sd("generate", "--prompt", "a red circle <lora:ink:0.5>", "--lora-dir", "loras", "--lora", "film.safetensors:0.7",
              "--checkpoint", "demo", "--steps", "1", "--seed", "1", "--output", "a.png")
    assert made.exit_code == 0, made.output
    text = Image.open("a.png").text["parameters"]
    ink, film = (read_lora(name, Path(path)).short_hash for name, path in (("ink", "loras/ink.safetensors"), ("film", "film.safetensors")))
    assert text.startswith("a red circle <lora:ink:0.5> <lora:film:0.7>\n")
    assert f'Lora hashes: "ink: {ink}, film: {film}"' in text
    # again from the image: film is not in the folder, and ink has changed since
    save_file(demo_lora(lora_sites(demo), seed=3), "loras/ink.safetensors")
    again = sd("generate", "--from", "a.png", "--lora-dir", "loras", "--checkpoint", "demo", "--output", "b.png")
    assert again.exit_code == 2
    warnings = [line for line in again.stderr.splitlines() if line.startswith("warning")]
    assert warnings[0].startswith(f"warning: a.png was made with the LoRA ink {ink}, not the ")
    assert warnings[1] == f"warning: a.png was made with the LoRA film ({film}), which is not in loras: put it there, or give --lora-dir or --lora FILE"
    assert again.stderr.splitlines()[-1].startswith("error: LoRA 'film' not found in loras")
    os.replace("film.safetensors", "loras/film.safetensors")
    rendered = sd("generate", "--from", "a.png", "--lora-dir", "loras", "--checkpoint", "demo", "--output", "c.png")
    assert rendered.exit_code == 0, rendered.output
    assert f'Lora hashes: "ink: {read_lora("ink", Path("loras/ink.safetensors")).short_hash}, film: {film}"' in Image.open("c.png").text["parameters"]


@pytest.mark.parametrize("tensors, message", [
    ({f"{LINEAR}.lora_down.weight": randn(4, 64), f"{LINEAR}.lora_up.weight": randn(48, 4), f"{LINEAR}.lora_extra": randn(4)},
     f"module {LINEAR} holds lora_extra, which sd does not read"),
    ({f"{LINEAR}.weight": randn(48), f"{LINEAR}.on_input": torch.tensor(True)},  # IA3
     f"module {LINEAR} holds on_input, weight, which sd does not read"),
    ({"lora_unet_not_a_layer.lora_down.weight": randn(4, 64), "lora_unet_not_a_layer.lora_up.weight": randn(48, 4)},
     "lora_unet_not_a_layer matches no layer of SD 1.5"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector": randn(48)}, "unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector is not a LoRA tensor's name"),
])
def test_a_tensor_sd_would_not_read_is_an_error_naming_it(demo, tmp_path, tensors, message):
    save_file(tensors, tmp_path / "odd.safetensors")
    with pytest.raises(SDError, match=message):
        generate("a red circle <lora:odd>", models=demo, loras=LoraLibrary(tmp_path), steps=1, seed=0, progress=False)
