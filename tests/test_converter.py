"""The converter maps every tensor of an SD 1.5 checkpoint onto exactly one of our parameters,
and refuses anything else with one clear error."""


import pytest
import torch
from checkpoints import sd15_shapes, write_checkpoint

from sd import SDError, load_models
from sd.models.clip import CLIP
from sd.models.decoder import Decoder
from sd.models.unet import UNet
from sd.models.encoder import Encoder
from sd.files.converter import IGNORED, convert, target_name, to_original


@pytest.fixture(scope="module")
def expected_shapes():
    with torch.device("meta"):
        models = {"clip": CLIP(), "encoder": Encoder(), "decoder": Decoder(), "diffusion": UNet()}
    return {f"{name}.{key}": value.shape for name, model in models.items() for key, value in model.state_dict().items()}


def meta_checkpoint(shapes=None):
    """The SD 1.5 checkpoint's names and shapes, without memory: enough to exercise the renaming."""
    return {name: torch.empty(shape, device="meta") for name, shape in (shapes or sd15_shapes()).items()}


def test_every_original_weight_maps_to_exactly_one_of_our_parameters(expected_shapes):
    shapes = sd15_shapes()
    assert len(shapes) == 1143
    claimed = {}
    for key in shapes:
        target = target_name(key)
        if target is None:
            continue
        assert target not in claimed, f"{key} and {claimed[target]} both map to {target}"
        claimed[target] = key
    ignored = set(shapes) - set(claimed.values())
    # Only the 12 schedule buffers and CLIP's position ids carry no weight.
    assert len(ignored) == 13 and all("." not in key or key.endswith("position_ids") for key in ignored)
    ours = {name for name, _ in claimed}
    assert ours == set(expected_shapes), (ours ^ set(expected_shapes))
    # Shapes: each original tensor, or the q/k/v parts joined, has exactly our parameter's shape.
    state = convert(meta_checkpoint(), expected_shapes, torch.float32, device="meta")
    assert {name: tensor.shape for name, tensor in state.items()} == expected_shapes
    assert sum(t.numel() for t in state.values()) == 1_066_235_307


def test_our_names_written_back_are_the_original_checkpoint_names(expected_shapes):
    """to_original (which writes the demo model) inverts the converter: on SD 1.5's own sizes it gives exactly
    the original names and shapes, fused projections split again and the VAE's attention as 1x1 convolutions."""
    ours = {name: torch.empty(shape, device="meta") for name, shape in expected_shapes.items()}
    written = {key: list(tensor.shape) for key, tensor in to_original(ours).items()}
    assert written == {key: shape for key, shape in sd15_shapes().items() if not IGNORED.match(key)}


def test_fused_attention_keeps_query_key_value_order(expected_shapes):
    prefix = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1."
    parts = {target_name(prefix + f"to_{letter}.weight") for letter in "qkv"}
    name = "diffusion.input_blocks.1.1.transformer_blocks.0.self_attention.in_proj.weight"
    assert parts == {(name, 0), (name, 1), (name, 2)}
    assert expected_shapes[name] == (960, 320)


def test_missing_tensor_is_named(expected_shapes):
    checkpoint = meta_checkpoint()
    del checkpoint["model.diffusion_model.out.2.weight"]
    with pytest.raises(SDError, match=r"1 missing \(diffusion\.conv_out\.weight\)"):
        convert(checkpoint, expected_shapes, torch.float32, device="meta")


def test_wrong_shape_is_named(expected_shapes):
    shapes = sd15_shapes()
    shapes["first_stage_model.decoder.conv_out.weight"] = [3, 128, 1, 1]
    with pytest.raises(SDError, match=r"wrong shape \(first_stage_model\.decoder\.conv_out\.weight \[\[3, 128, 1, 1\]\] \(expected \[3, 128, 3, 3\]\)"):
        convert(meta_checkpoint(shapes), expected_shapes, torch.float32, device="meta")


def test_sd2_checkpoint_is_recognised(expected_shapes):
    checkpoint = {k: v for k, v in meta_checkpoint().items() if not k.startswith("cond_stage_model.")}
    checkpoint["cond_stage_model.model.token_embedding.weight"] = torch.empty(49408, 1024, device="meta")
    with pytest.raises(SDError, match="Stable Diffusion 2.x"):
        convert(checkpoint, expected_shapes, torch.float32, device="meta")


def test_unexpected_tensor_is_named(expected_shapes):
    checkpoint = meta_checkpoint()
    checkpoint["model.diffusion_model.extra.weight"] = torch.empty(4, device="meta")
    with pytest.raises(SDError, match=r"1 unexpected \(model\.diffusion_model\.extra\.weight\)"):
        convert(checkpoint, expected_shapes, torch.float32, device="meta")


def test_ema_copies_and_schedule_are_ignored(expected_shapes):
    checkpoint = meta_checkpoint()
    checkpoint["model_ema.decay"] = torch.empty((), device="meta")
    checkpoint["model_ema.diffusion_modelout2weight"] = torch.empty(4, 320, 3, 3, device="meta")
    assert len(convert(checkpoint, expected_shapes, torch.float32, device="meta")) == len(expected_shapes)


class RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_callable_is_refused_without_running(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "payload": RunsCode()}, path)
    with pytest.raises(SDError, match="refusing .*evil.ckpt: it would call builtins.print, and a checkpoint must hold only tensors"):
        load_models(path)
    assert "this must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file_is_reported(tmp_path, suffix):
    path = write_checkpoint({"model.diffusion_model.out.2.weight": torch.randn(64, 64)}, tmp_path / f"small{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SDError, match="truncated"):
        load_models(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_non_checkpoint_file_is_reported(tmp_path, suffix):
    path = tmp_path / f"notes{suffix}"
    path.write_text("these are my notes, not a checkpoint\n")
    with pytest.raises(SDError, match="not a checkpoint|not a PyTorch checkpoint"):
        load_models(path)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(SDError, match="checkpoint not found: .*nowhere.safetensors"):
        load_models(tmp_path / "nowhere.safetensors")


def test_small_file_lists_missing_tensors(tmp_path):
    path = write_checkpoint({"model.diffusion_model.out.2.bias": torch.zeros(4)}, tmp_path / "partial.safetensors")
    with pytest.raises(SDError, match=r"not an SD 1.x checkpoint: tensors 1041 missing"):
        load_models(path)


def test_ckpt_without_state_dict_wrapper_is_read(tmp_path):
    path = tmp_path / "bare.ckpt"
    torch.save({"model.diffusion_model.out.2.bias": torch.zeros(4)}, path)
    # Read as a dictionary of tensors: everything but the one tensor is reported missing.
    with pytest.raises(SDError, match=r"tensors 1041 missing"):
        load_models(path)
