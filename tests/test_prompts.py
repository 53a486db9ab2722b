"""AUTOMATIC1111's prompt dialect (sd/prompts/conditioning.py): parsing, chunks, encoding.

The parsing cases marked "A1111" are the worked cases of A1111's own docstrings and the quirks checked by running
its code (shared reference a1111-formats.md, sections 1 and 2); the others are ours, worked out by hand from the
rules. Weights are compared exactly (==): they are products of the same floats in the same order as A1111's.
"""

import gc
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import cli

from sd import Settings, generate
from sd.errors import SDError
from sd.prompts.editing import Timeline
from sd.prompts.conditioning import encode_prompt, guidance_contexts, parse_prompt, prompt_chunks
from sd.prompts.tokenizer import load_clip_tokenizer

PARSE_CASES = {
    # A1111's docstring cases
    "normal text": [("normal text", 1.0)],
    "an (important) word": [("an ", 1.0), ("important", 1.1), (" word", 1.0)],
    "(unbalanced": [("unbalanced", 1.1)],
    "\\(literal\\]": [("(literal]", 1.0)],
    "(unnecessary)(parens)": [("unnecessaryparens", 1.1)],
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1),
    ],
    # A1111's quirks
    "(a:1e2)": [("a:1e2", 1.1)],  # 1e2 is not a weight: the colon is text
    "(a BREAK b)": [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)],  # the marker is weighed too
    # ours
    "": [("", 1.0)],
    "[a]": [("a", 1 / 1.1)],
    "[[a]]": [("a", 1 / 1.1 / 1.1)],
    "((a))": [("a", 1.1 * 1.1)],
    "(a:1.5)": [("a", 1.5)],
    "(a: 0.5 ) b": [("a", 0.5), (" b", 1.0)],  # spaces around the number
    "((a:2) b:0.5)": [("a", 1.0), (" b", 0.5)],  # nested weights multiply: 2 x 0.5
    "(a [b] c)": [("a ", 1.1), ("b", (1 / 1.1) * 1.1), (" c", 1.1)],
    "[a (b) c": [("a ", 1 / 1.1), ("b", 1.1 * (1 / 1.1)), (" c", 1 / 1.1)],
    "a) b] c:": [("a) b] c:", 1.0)],  # brackets that close nothing, a lone colon: text
    "a:1.5) b": [("a:1.5) b", 1.0)],  # a weight with no round bracket open: text
    "\\\\(a\\)": [("\\", 1.0), ("a)", 1.1)],  # an escaped backslash, then a real bracket; unclosed, it weighs to the end
    "a \\x b": [("a x b", 1.0)],  # a lone backslash is dropped
    "\\[a\\] \\(b\\)": [("[a] (b)", 1.0)],
    "a BREAK b": [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)],
    "BREAK a": [("", 1.0), ("BREAK", -1.0), ("a", 1.0)],
    "a BREAK": [("a", 1.0), ("BREAK", -1.0), ("", 1.0)],
    "a BREAKING news": [("a BREAKING news", 1.0)],  # only the whole word
    "a break b": [("a break b", 1.0)],  # only in capitals
}


@pytest.mark.parametrize("text, expected", PARSE_CASES.items(), ids=list(PARSE_CASES))
def test_parse_prompt(text, expected):
    assert parse_prompt(text) == expected


@pytest.mark.parametrize("text, position", [("(a:1.2.3)", 4), ("x (a:..)", 6), ("((b:-.))", 5)])
def test_bad_weight_is_one_line_naming_its_position(text, position):
    with pytest.raises(SDError, match=f"at character {position} ") as error:
        parse_prompt(text)
    assert "\n" not in str(error.value)


BOS, EOS, COMMA, A, B = 49406, 49407, 267, 320, 321  # "a" and "b" are one token each


def chunk(ids: list[int], weights: list[float] | None = None) -> tuple[list[int], list[float]]:
    """A chunk as A1111 makes it from up to 75 tokens: start, tokens, end tokens up to 77; weight 1 but the tokens'."""
    padding = 75 - len(ids)
    return [BOS, *ids] + [EOS] * (padding + 1), [1.0, *(weights or [1.0] * len(ids))] + [1.0] * (padding + 1)


def words(word: str, count: int) -> str:
    return " ".join([word] * count)


CHUNK_CASES = {
    "empty prompt": ("", [chunk([])]),
    "short": ("a b", [chunk([A, B])]),
    "weights per token": ("(a:1.5) [b]", [chunk([A, B], [1.5, 1 / 1.1])]),
    "BPE within a fragment only": ("(a)b", [chunk([A, B], [1.1, 1.0])]),  # "ab" alone is one other token
    "75 tokens: one chunk": (words("a", 75), [chunk([A] * 75)]),
    "76 tokens: two": (words("a", 76), [chunk([A] * 75), chunk([A])]),
    "200 tokens": (words("a", 200), [chunk([A] * 75), chunk([A] * 75), chunk([A] * 50)]),
    "BREAK": ("a BREAK b", [chunk([A]), chunk([B])]),
    "BREAK at the start: an empty chunk": ("BREAK a", [chunk([]), chunk([A])]),
    "BREAK at the end: nothing more": ("a BREAK", [chunk([A])]),
    "BREAK twice": ("a BREAK BREAK b", [chunk([A]), chunk([]), chunk([B])]),
    "BREAK in brackets is the word, weighed -1.1": ("(a BREAK b)", [chunk([A, 2568, B], [1.1, -1.1, 1.1])]),
    # a comma 20 tokens before the cut: the chunk ends after it, the 20 words after it go on together
    "comma 20 before the cut": (f"{words('a', 55)}, {words('b', 30)}", [chunk([A] * 55 + [COMMA]), chunk([B] * 30)]),
    "comma 21 before the cut: a plain cut": (
        f"{words('a', 54)}, {words('b', 30)}", [chunk([A] * 54 + [COMMA] + [B] * 20), chunk([B] * 10)]
    ),
    "comma as the 75th token": (f"{words('a', 74)}, b", [chunk([A] * 74 + [COMMA]), chunk([B])]),
    "comma as the 76th token": (f"{words('a', 75)}, b", [chunk([A] * 75), chunk([COMMA, B])]),
    "the last comma counts": (
        f"{words('a', 50)}, {words('a', 10)}, {words('b', 30)}",
        [chunk([A] * 50 + [COMMA] + [A] * 10 + [COMMA]), chunk([B] * 30)],
    ),
    "moved words keep their weights": (
        f"{words('a', 60)}, ({words('b', 30)})", [chunk([A] * 60 + [COMMA]), chunk([B] * 30, [1.1] * 30)]
    ),
}


@pytest.mark.parametrize("text, expected", CHUNK_CASES.values(), ids=list(CHUNK_CASES))
def test_prompt_chunks(text, expected):
    assert prompt_chunks(text) == expected


@pytest.mark.parametrize("text", ["a BREAK b", "(a) [b:1.5] \\("])
def test_emphasis_none_reads_the_prompt_as_plain_text(text):
    tokens = load_clip_tokenizer()(text, add_special_tokens=False).input_ids
    assert prompt_chunks(text, emphasis="none") == [chunk(tokens)]


# Encoding on the random full-size checkpoint, against transformers' CLIPTextModel on the same weights.
#
# The rule, computed here as A1111 states it: each chunk through CLIP on its own (a batch of one); clip skip n
# reads hidden_states[-n] through the final layer norm (n = 1: last_hidden_state); then each token's vector times
# its weight and, for "original", the chunk times (its mean before / its mean after); the chunks one after another.
# Tolerance: max |ours - rule| <= 1e-5 * max |rule|, fp32 on both sides. The two differ only in the order of
# their sums (fused q/k/v, our chunks in one batch); through 12 layers that is about 1e-6 of the output's scale,
# while a wrong layer, a mean over the wrong axes or a weight on the wrong token changes it by 1e-3 or more.
RELATIVE_TOLERANCE = 1e-5
# 2 chunks, of 56 and 21 tokens: the 75-token cut falls 19 tokens after the comma that ends the first
WEIGHTED_PROMPT = ", ".join([
    "(masterpiece, best quality:1.2), a (red:1.3) house on [a hill] " + words("lake", 20),
    words("tree", 20) + " (((sky)))",
    "[[blurry]], " + words("cloud", 20) + " (sun:0.5)",
])


@pytest.fixture(scope="module")
def reference_hidden_states(safetensors_checkpoint):
    """transformers' CLIP outputs for each chunk of WEIGHTED_PROMPT, and its final layer norm."""
    from reference import reference_clip

    clip = reference_clip(safetensors_checkpoint)
    with torch.no_grad():
        outputs = [clip(input_ids=torch.tensor([ids]), output_hidden_states=True) for ids, _ in prompt_chunks(WEIGHTED_PROMPT)]
    yield outputs, clip.final_layer_norm
    del clip
    gc.collect()


def a1111_rule(outputs, final_layer_norm, clip_skip: int, emphasis: str) -> torch.Tensor:
    from reference import a1111_emphasis

    encoded = []
    with torch.no_grad():
        for output, (_, weights) in zip(outputs, prompt_chunks(WEIGHTED_PROMPT)):
            z = output.last_hidden_state if clip_skip == 1 else final_layer_norm(output.hidden_states[-clip_skip])  # (1, 77, 768)
            encoded.append(a1111_emphasis(z, weights, emphasis))
    return torch.cat(encoded, dim=1).float()


@pytest.mark.parametrize("clip_skip, emphasis", [(1, "original"), (1, "no-norm"), (1, "ignore"), (2, "original"), (3, "original")])
def test_encode_prompt_equals_a1111s_rule_on_transformers_clip(models, reference_hidden_states, clip_skip, emphasis):
    assert [ids.count(EOS) for ids, _ in prompt_chunks(WEIGHTED_PROMPT)] == [77 - 57, 77 - 22]
    expected = a1111_rule(*reference_hidden_states, clip_skip, emphasis)
    with torch.inference_mode():
        actual = encode_prompt(models, WEIGHTED_PROMPT, clip_skip=clip_skip, emphasis=emphasis)
    assert actual.shape == expected.shape == (1, 154, 768)
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    print(f"clip skip {clip_skip}, {emphasis}: max abs diff {error:.3g}, ratio {error / scale:.3g}")
    assert error <= RELATIVE_TOLERANCE * scale


# The render's context, on the demo model (its text encoder is small: these need no lock)


def guidance_context(models, settings, num_images, guided):
    """The context of a render of one pass (of 10 steps; these prompts have no edits)."""
    (contexts,), _ = guidance_contexts(models, settings, num_images, guided, [Timeline(10)])
    return contexts


def test_the_shorter_prompt_is_padded_with_the_empty_prompts_encoding(demo):
    settings = Settings("a red circle BREAK on the left", negative_prompt="(blue:1.4) square", clip_skip=2, emphasis="no-norm")
    with torch.inference_mode():
        context = guidance_context(demo, settings, num_images=2, guided=True)(0)
        prompt, negative, empty = (encode_prompt(demo, text, clip_skip=2, emphasis="no-norm") for text in (settings.prompt, settings.negative_prompt, ""))
    assert prompt.shape[1] == 154 and negative.shape[1] == empty.shape[1] == 77
    assert torch.equal(context, torch.cat([torch.cat([negative, empty], dim=1)] * 2 + [prompt] * 2))


@pytest.mark.parametrize("prompt, negative, guided, length", [
    ("a red circle", "blue square", True, 77),
    ("a red circle BREAK left", "", False, 154),  # unguided: the negative prompt is not read
    ("a red circle BREAK left", "a BREAK b BREAK c", True, 231),
])
def test_the_context_is_as_long_as_the_longer_prompt(demo, prompt, negative, guided, length):
    with torch.inference_mode():
        context = guidance_context(demo, Settings(prompt, negative_prompt=negative), 1, guided)(0)
        alone = encode_prompt(demo, prompt)
    assert context.shape[:2] == (1 + guided, length)
    assert torch.equal(context[-1, : alone.shape[1]], alone[0])


def test_generate_reads_long_weighted_prompts(demo):
    prompt = "(a red circle:1.2) on the left, " + words("[red]", 80)  # 2 chunks
    image, = generate(prompt, models=demo, steps=2, seed=0, clip_skip=2, emphasis="no-norm", progress=False)
    assert image.size == (64, 64)
    assert (image.info["sd"].prompt, image.info["sd"].clip_skip, image.info["sd"].emphasis) == (prompt, 2, "no-norm")


def test_clip_skip_beyond_the_text_encoders_layers_is_refused(demo):
    with pytest.raises(SDError, match="^clip skip must be between 1 and 2, the text encoder.s layers, got 3: give at most 2 with this checkpoint$"):
        encode_prompt(demo, "a red circle", clip_skip=3)


# Settings, infotext, command

INFOTEXT_CASES = [
    # (settings, fields written): Clip skip from 2 on; Emphasis where it is not Original and a prompt has brackets
    (Settings("a cat"), []),
    (Settings("a cat", clip_skip=2), ["Clip skip: 2"]),
    (Settings("a (cat)", emphasis="no-norm"), ["Emphasis: No norm"]),
    (Settings("a cat", negative_prompt="[dog]", emphasis="ignore", clip_skip=3), ["Clip skip: 3", "Emphasis: Ignore"]),
    (Settings("a (cat", emphasis="none"), ["Emphasis: None"]),
    (Settings("a cat", emphasis="no-norm"), []),  # no brackets: the same image as Original
]


@pytest.mark.parametrize("settings, fields", INFOTEXT_CASES)
def test_clip_skip_and_emphasis_in_the_infotext(settings, fields):
    text = settings.to_infotext()
    assert [field for field in text.split("\n")[-1].split(", ") if field.startswith(("Clip skip", "Emphasis"))] == fields
    assert text.split("\n")[0] == settings.prompt  # as written
    read = Settings.from_infotext(text)
    assert (read.clip_skip, read.emphasis) == (settings.clip_skip, settings.emphasis if fields and "Emphasis" in fields[-1] else "original")


@pytest.mark.parametrize("args, expected", [
    (["--prompt", "(a:1.2.3)"], "error: prompt: weight '1.2.3' at character 4 is not a number"),
    (["--prompt", "a", "--negative-prompt", "x (b: 1.2.3)"], "error: negative prompt: weight '1.2.3' at character 7 is not a number"),
    (["--prompt", "a", "--clip-skip", "13"], "'--clip-skip': 13 is not in the range 1<=x<=12"),
    (["--prompt", "a", "--emphasis", "strong"], "'--emphasis': 'strong' is not one of"),
])
def test_bad_prompts_are_one_line_exit_2_before_loading(tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    Path("not-a-checkpoint.safetensors").write_bytes(b"\0" * 100)
    result = CliRunner().invoke(cli.main, ["generate", *args, "--checkpoint", "not-a-checkpoint.safetensors"])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 or "Usage" in result.output


def test_a_prompt_with_emphasis_none_is_not_parsed():
    assert Settings("(a:1.2.3)", emphasis="none").prompt == "(a:1.2.3)"
