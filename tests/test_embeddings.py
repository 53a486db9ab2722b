"""Textual-inversion embeddings: files read safely (sd/prompts/embeddings.py), placed in a prompt's chunks and encoded
(sd/prompts/conditioning.py), named in the image's settings (TI hashes), and the command's errors.

The placement rules are A1111's (shared reference a1111-formats.md, "TI placement"); the tables below are ours,
worked out by hand from them. The encoding is compared with diffusers' load_textual_inversion on the random
full-size checkpoint; the render's context and its settings on the demo model.
"""

import gc
import hashlib
import logging
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

import cli
from sd import Settings, generate, load_embeddings
from sd.prompts import embeddings
from sd.prompts.embeddings import Embedding
from sd.errors import SDError
from sd.prompts.editing import Timeline
from sd.prompts.conditioning import chunk_prompt, encode_prompt, guidance_contexts, prompt_chunks
from sd.settings import read_infotext
from test_prompts import chunk, words

TRIGGER = "tiemb"  # two tokens, "tiem" "b", none of them a word of its own
BOS, EOS, COMMA, A, B, TI = 49406, 49407, 267, 320, 321, 0  # TI: the placeholder of an embedding's vector


def random_vectors(count: int, width: int = 768, seed: int = 0) -> torch.Tensor:
    """Vectors of the scale of the random checkpoint's token embeddings."""
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed)) * 0.02


# Each format as its tool writes it; the name stored inside A1111's files is not the trigger word.
WRITERS = {
    "a1111.pt": lambda path, vectors: torch.save(
        {"string_to_param": {"*": vectors}, "string_to_token": {"*": 265}, "name": "another-name", "step": 3000,
         "sd_checkpoint": "6ce0161689", "sd_checkpoint_name": "v1-5-pruned-emaonly"}, path),
    "a1111-old.pt": lambda path, vectors: torch.save(  # A1111's old files: an nn.ParameterDict
        {"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors)}), "name": "another-name"}, path),
    "kohya.safetensors": lambda path, vectors: save_file({"emb_params": vectors}, path),
    "diffusers.bin": lambda path, vectors: torch.save({"<concept>": vectors}, path),
    "diffusers.safetensors": lambda path, vectors: save_file({"<concept>": vectors}, path),
}


def write_embedding(folder: Path, kind: str, vectors: torch.Tensor, name: str = TRIGGER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name + Path(kind).suffix)
    WRITERS[kind](path, vectors)
    return path


# Reading


@pytest.mark.parametrize("kind", WRITERS)
def test_each_format_gives_its_vectors_under_the_files_name(tmp_path, kind):
    vectors = random_vectors(2)
    path = write_embedding(tmp_path, kind, vectors)
    loaded = load_embeddings(tmp_path)
    assert list(loaded) == [TRIGGER]
    embedding = loaded[TRIGGER]
    assert embedding.name == TRIGGER and torch.equal(embedding.vectors, vectors) and embedding.vectors.dtype == torch.float32
    assert embedding.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and embedding.short_hash == embedding.sha256[:12]


def test_diffusers_single_vector_is_one_vector(tmp_path):
    torch.save({"<cat-toy>": random_vectors(1)[0]}, tmp_path / "cat-toy.bin")  # (768,)
    assert load_embeddings(tmp_path)["cat-toy"].vectors.shape == (1, 768)


def test_other_files_are_left_alone_and_subfolders_read(tmp_path):
    (tmp_path / "README.md").write_text("embeddings go here")
    Image.new("RGB", (8, 8)).save(tmp_path / "preview.png")
    write_embedding(tmp_path / "styles", "kohya.safetensors", random_vectors(3), name="deep")
    assert {name: len(embedding.vectors) for name, embedding in load_embeddings(tmp_path).items()} == {"deep": 3}


def test_the_same_trigger_word_twice_keeps_the_first_file(tmp_path, caplog):
    first = write_embedding(tmp_path / "a", "a1111.pt", random_vectors(1, seed=1))
    second = write_embedding(tmp_path / "b", "kohya.safetensors", random_vectors(2, seed=2))
    loaded = load_embeddings(tmp_path)
    assert loaded[TRIGGER].sha256 == hashlib.sha256(first.read_bytes()).hexdigest()
    assert f"embedding {second} has the trigger word of an earlier file" in caplog.text


class RunsCode:
    """Unpickled, makes the folder `marker`: what a malicious embedding file could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_pt_file_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "embeddings" / f"{TRIGGER}.pt"
    path.parent.mkdir()
    torch.save({"string_to_param": {"*": random_vectors(2)}, "name": TRIGGER, "payload": RunsCode(marker)}, path)
    with pytest.raises(SDError, match=f"refusing {path}: it would call posix.mkdir, and an embedding must hold only tensors") as error:
        load_embeddings(path.parent)
    assert "\n" not in str(error.value)
    assert not marker.exists()
    # the control: an unsafe load does run it
    torch.load(path, weights_only=False)
    assert marker.is_dir()


def test_an_embedding_for_another_model_is_skipped_with_a_warning(tmp_path, caplog):
    sd2 = write_embedding(tmp_path, "a1111.pt", random_vectors(2, width=1024), name="sd2-style")
    sdxl = tmp_path / "sdxl-style.safetensors"
    save_file({"clip_g": random_vectors(2, width=1280), "clip_l": random_vectors(2)}, sdxl)
    write_embedding(tmp_path, "kohya.safetensors", random_vectors(2))
    with caplog.at_level(logging.WARNING, logger="sd"):
        assert list(load_embeddings(tmp_path)) == [TRIGGER]
    assert f"skipped embedding {sd2}: its vectors are 1024 wide, for SD 2.x; SD 1.5's are 768" in caplog.text
    assert f"skipped embedding {sdxl}: it is for SDXL" in caplog.text


def a1111_file_cut_short(path: Path) -> None:
    WRITERS["a1111.pt"](path, random_vectors(2))
    path.write_bytes(path.read_bytes()[:300])


DAMAGED = {
    "text as .pt": ("x.pt", lambda path: path.write_text("not a pickle"), "it is damaged or not a PyTorch file"),
    "cut short": ("x.pt", a1111_file_cut_short, "it is damaged"),
    "text as .safetensors": ("x.safetensors", lambda path: path.write_text("not safetensors"), "it is damaged"),
    "two tensors": ("x.safetensors", lambda path: save_file({"a": random_vectors(1), "b": random_vectors(1)}, path),
                    "is not a textual-inversion embedding (it holds a, b)"),
    "a list": ("x.pt", lambda path: torch.save([random_vectors(1)], path), "holds a list, not an embedding's dictionary"),
    "80 vectors": ("x.bin", lambda path: torch.save({"x": random_vectors(80)}, path), "shape (80, 768), not 1 to 75 vectors"),
}


@pytest.mark.parametrize("name, write, message", DAMAGED.values(), ids=list(DAMAGED))
def test_a_damaged_file_is_one_line_naming_it(tmp_path, name, write, message):
    write(tmp_path / name)
    with pytest.raises(SDError) as error:
        load_embeddings(tmp_path)
    assert str(tmp_path / name) in str(error.value) and message in str(error.value) and "\n" not in str(error.value)


def test_a_folder_given_must_exist_the_default_need_not(tmp_path, monkeypatch):
    with pytest.raises(SDError, match=f"embeddings folder {tmp_path / 'nowhere'} does not exist"):
        load_embeddings(tmp_path / "nowhere")
    (tmp_path / "file").write_text("")
    with pytest.raises(SDError, match="is a file"):
        load_embeddings(tmp_path / "file")
    monkeypatch.setattr(embeddings, "DEFAULT_FOLDER", tmp_path / "nowhere")
    assert load_embeddings() == {}
    monkeypatch.setattr(embeddings, "DEFAULT_FOLDER", tmp_path)
    write_embedding(tmp_path, "kohya.safetensors", random_vectors(2))
    assert list(load_embeddings()) == [TRIGGER]


# Placement: each trigger word's tokens become one placeholder per vector, weighed as its fragment, never split
# across chunks. Vectors as made here: these tables need only their number.

EMBEDDINGS = {name: Embedding(name, random_vectors(count), "0" * 64) for name, count in ((TRIGGER, 2), (f"{TRIGGER}-two", 3), ("long", 75))}


PLACEMENT_CASES = {
    "in a prompt": ("a tiemb b", [chunk([A, TI, TI, B])], [(0, 2, TRIGGER)]),
    "twice": ("tiemb b tiemb", [chunk([TI, TI, B, TI, TI])], [(0, 1, TRIGGER), (0, 4, TRIGGER)]),
    "weighed as its fragment": ("(tiemb:1.5) [b]", [chunk([TI, TI, B], [1.5, 1.5, 1 / 1.1])], [(0, 1, TRIGGER)]),
    "a word that only begins with it": ("tiembs", [chunk([555, 3692, 338])], []),  # ti emb s: other tokens
    "the longest trigger first": ("tiemb-two tiemb", [chunk([TI] * 5)], [(0, 1, "tiemb-two"), (0, 4, TRIGGER)]),
    "after BREAK": ("a BREAK tiemb", [chunk([A]), chunk([TI, TI])], [(1, 1, TRIGGER)]),
    "fits at the end of a chunk": (f"{words('a', 73)} tiemb", [chunk([A] * 73 + [TI, TI])], [(0, 74, TRIGGER)]),
    "one token short: the next chunk": (f"{words('a', 74)} tiemb", [chunk([A] * 74), chunk([TI, TI])], [(1, 1, TRIGGER)]),
    "a full chunk": (f"{words('a', 75)} tiemb", [chunk([A] * 75), chunk([TI, TI])], [(1, 1, TRIGGER)]),
    "75 vectors fill a chunk": ("a long", [chunk([A]), chunk([TI] * 75)], [(1, 1, "long")]),
    # it arrives at a full chunk with a comma 15 tokens back: the words after the comma move on, then it follows them
    "at a full chunk after a comma": (
        f"{words('a', 60)}, {words('a', 14)} tiemb", [chunk([A] * 60 + [COMMA]), chunk([A] * 14 + [TI, TI])], [(1, 15, TRIGGER)]
    ),
    # A1111's quirk, kept so that an A1111 prompt gives A1111's conditioning: the words after the comma move on
    # to the next chunk, the embedding's placement stays where it was. Its vectors replace the closed chunk's
    # padding (positions 57, 58), and its placeholders go on as the token "!" (0).
    "moved by a comma: A1111's quirk": (
        f"{words('a', 55)}, tiemb {words('b', 17)} a", [chunk([A] * 55 + [COMMA]), chunk([TI, TI] + [B] * 17 + [A])], [(0, 57, TRIGGER)]
    ),
}


@pytest.mark.parametrize("text, chunks, placements", PLACEMENT_CASES.values(), ids=list(PLACEMENT_CASES))
def test_placement(text, chunks, placements):
    placed_chunks, placed = chunk_prompt(text, embeddings=EMBEDDINGS)
    assert placed_chunks == chunks == prompt_chunks(text, embeddings=EMBEDDINGS)
    assert [(chunk, position, embedding.name) for chunk, position, embedding in placed] == placements


def test_with_emphasis_none_the_trigger_is_still_found():
    placed_chunks, placed = chunk_prompt("(tiemb:1.5)", "none", EMBEDDINGS)
    assert placed_chunks[0][0][1:4] == [263, TI, TI] and [(chunk, position) for chunk, position, _ in placed] == [(0, 2)]  # "(" first


def test_without_embeddings_the_trigger_is_text():
    assert prompt_chunks("a tiemb b") == prompt_chunks("a tiemb b", embeddings={}) == [chunk([A, 34762, 321, B])]


# Encoding on the random full-size checkpoint, against diffusers' StableDiffusionPipeline.encode_prompt after
# load_textual_inversion(path, token=<file name>) on transformers' CLIP with the same weights. diffusers adds the
# embedding's vectors as new tokens of the vocabulary; we place them over the trigger's placeholders. Without
# weights A1111's emphasis leaves the vectors as they are (times 1, times mean / mean = 1).
# Tolerance: max |ours - diffusers| <= 1e-5 * max |diffusers|, fp32, as for the prompt tests (tests/test_prompts.py):
# the two differ only in the order of their sums, while a vector in the wrong place changes the output by far more
# (checked below against the same prompt without the embedding).
RELATIVE_TOLERANCE = 1e-5
PROMPT = "a photo of tiemb on a hill, tiemb"


@pytest.fixture(scope="module")
def reference_text_encoder(safetensors_checkpoint):
    from reference import reference_clip

    clip = reference_clip(safetensors_checkpoint)
    yield clip
    del clip
    gc.collect()


def diffusers_encoding(text_encoder, path: Path, prompt: str) -> torch.Tensor:
    """diffusers' prompt encoding (1, 77, 768) with the embedding at `path` loaded under its file's name."""
    from diffusers import StableDiffusionPipeline
    from reference import reference_tokenizer

    pipeline = StableDiffusionPipeline(vae=None, text_encoder=text_encoder, tokenizer=reference_tokenizer(), unet=None, scheduler=None,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.load_textual_inversion(str(path), token=path.stem)
    try:
        with torch.no_grad():
            encoded, _ = pipeline.encode_prompt(prompt, "cpu", 1, False)
    finally:
        pipeline.unload_textual_inversion()  # the shared text encoder as it was
    return encoded


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("kind", ["a1111.pt", "kohya.safetensors", "diffusers.bin"])
def test_encoding_equals_diffusers_load_textual_inversion(models, reference_text_encoder, tmp_path, kind):
    path = write_embedding(tmp_path, kind, random_vectors(2, seed=3))
    expected = diffusers_encoding(reference_text_encoder, path, PROMPT)
    with torch.inference_mode():
        actual = encode_prompt(models, PROMPT, embeddings=load_embeddings(tmp_path))
        without = encode_prompt(models, PROMPT)
    assert actual.shape == expected.shape == (1, 77, 768)
    error, effect = relative_error(actual, expected), relative_error(without, expected)
    print(f"{kind}: max abs diff / max abs = {error:.3g}; without the embedding {effect:.3g}")
    assert error <= RELATIVE_TOLERANCE and effect > 100 * RELATIVE_TOLERANCE


def test_emphasis_weighs_the_embeddings_vectors(models, reference_text_encoder, tmp_path):
    """A1111's rule on diffusers' output: each vector times its weight, then the chunk's mean restored (in fp64)."""
    path = write_embedding(tmp_path, "kohya.safetensors", random_vectors(2, seed=4))
    plain = diffusers_encoding(reference_text_encoder, path, "a photo of tiemb").double()
    weights = torch.ones(77, dtype=torch.float64)
    weights[4:6] = 1.3  # start, "a photo of", then the two vectors
    weighted = plain * weights[None, :, None]
    expected = (weighted * (plain.mean() / weighted.mean())).float()
    with torch.inference_mode():
        actual = encode_prompt(models, "a photo of (tiemb:1.3)", embeddings=load_embeddings(tmp_path))
    error = relative_error(actual, expected)
    print(f"(tiemb:1.3): max abs diff / max abs = {error:.3g}")
    assert error <= RELATIVE_TOLERANCE and relative_error(plain.float(), expected) > 100 * RELATIVE_TOLERANCE


# The render, on the demo model (its text encoder is 64 wide: these embeddings are made for it)


DEMO_EMBEDDINGS = {name: Embedding(name, random_vectors(2, width=64, seed=seed), f"{seed}" * 64) for name, seed in (("tiemb", 1), ("unused", 2), ("neg", 3))}


def test_a_trigger_in_the_negative_prompt_is_encoded(demo, caplog):
    settings = Settings("a red circle", negative_prompt="neg square")
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="sd"):
        (contexts,), _ = guidance_contexts(demo, settings, 1, True, [Timeline(10)], embeddings=DEMO_EMBEDDINGS)
        context = contexts(0)
        negative = encode_prompt(demo, settings.negative_prompt, embeddings=DEMO_EMBEDDINGS)
        as_words = encode_prompt(demo, settings.negative_prompt)
    assert torch.equal(context[0], negative[0]) and not torch.equal(negative, as_words)
    assert caplog.text.count("does not know these words") == 1  # neg read as words, not the placeholders


def test_the_settings_name_the_embeddings_used(demo):
    prompt = "a red circle [tiemb:on the left:1]"  # used in the first step only
    image, = generate(prompt, negative_prompt="neg", models=demo, embeddings=DEMO_EMBEDDINGS, steps=2, seed=0, progress=False)
    made = image.info["sd"]
    assert made.ti_hashes == {"neg": "333333333333", "tiemb": "111111111111"}  # the negative prompt first, as A1111
    assert 'TI hashes: "neg: 333333333333, tiemb: 111111111111"' in made.to_infotext()
    unguided, = generate(prompt, negative_prompt="neg", cfg_scale=1.0, models=demo, embeddings=DEMO_EMBEDDINGS, steps=2, seed=0, progress=False)
    assert unguided.info["sd"].ti_hashes == {"tiemb": "111111111111"}  # the negative prompt is not read


def test_an_embedding_of_another_width_is_refused_when_used(demo):
    with pytest.raises(SDError, match="embedding tiemb has vectors 768 wide, but this model's text encoder takes 64"):
        encode_prompt(demo, "a tiemb", embeddings=EMBEDDINGS)


# Settings and the command


def test_ti_hashes_are_written_and_read_as_a1111_does():
    settings = Settings("a tiemb", negative_prompt="[bad:hands]", emphasis="no-norm",
                        ti_hashes={"tiemb": "0123456789ab", "bad:hands,v2": "ba9876543210"})
    fields = settings.to_infotext().split("\n")[-1]
    assert fields.endswith('TI hashes: "tiemb: 0123456789ab, badhandsv2: ba9876543210", Emphasis: No norm')
    read = read_infotext(settings.to_infotext())
    assert read.settings.ti_hashes == {"tiemb": "0123456789ab", "badhandsv2": "ba9876543210"} and read.ignored == []
    a1111 = 'a photo\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, TI hashes: "EasyNegative: c74b4e810b03, style: 1d2c3b4a5f6e", Version: v1.10.1'
    assert Settings.from_infotext(a1111).ti_hashes == {"EasyNegative": "c74b4e810b03", "style": "1d2c3b4a5f6e"}
    assert "TI hashes" not in Settings("a tiemb").to_infotext()


def sd(*args):
    return CliRunner().invoke(cli.main, list(map(str, args)), prog_name="sd")


@pytest.mark.parametrize("setup, expected", [
    (lambda folder: None, "error: embeddings folder embeddings does not exist"),
    (lambda folder: (folder.mkdir(), (folder / "bad.pt").write_text("x")), "error: cannot read embedding embeddings/bad.pt: it is damaged"),
])
def test_bad_embeddings_are_one_line_exit_2_before_loading(command_environment, setup, expected):
    setup(Path("embeddings"))
    Path("not-a-checkpoint.safetensors").write_bytes(b"\0" * 100)
    result = sd("generate", "--prompt", "a tiemb", "--embeddings", "embeddings", "--checkpoint", "not-a-checkpoint.safetensors")
    assert result.exit_code == 2 and result.output.startswith(expected) and len(result.output.strip().splitlines()) == 1, result.output


def test_the_command_uses_the_folder_and_names_the_embeddings_in_the_image(command_environment, monkeypatch):
    monkeypatch.setattr(embeddings, "WIDTH", 64)  # the demo model's text encoder
    path = write_embedding(Path("embeddings"), "kohya.safetensors", random_vectors(2, width=64))
    short_hash = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    made = sd("generate", "--prompt", "a red circle tiemb", "--embeddings", "embeddings", "--checkpoint", "demo", "--steps", "1", "--output", "a.png")
    assert made.exit_code == 0, made.output
    assert f'TI hashes: "tiemb: {short_hash}"' in Image.open("a.png").text["parameters"]
    write_embedding(Path("embeddings"), "kohya.safetensors", random_vectors(2, width=64, seed=9))
    again = sd("generate", "--from", "a.png", "--embeddings", "embeddings", "--checkpoint", "demo", "--output", "b.png")
    assert again.exit_code == 0, again.output
    assert f"warning: a.png was made with the embedding tiemb {short_hash}, not the " in again.stderr
