"""AUTOMATIC1111's prompt dialect (sd/prompts.py): parsing, chunks, encoding.

The parsing cases marked "A1111" are the worked cases of A1111's own docstrings and the quirks checked by running
its code (shared reference a1111-formats.md, sections 1 and 2); the others are ours, worked out by hand from the
rules. Weights are compared exactly (==): they are products of the same floats in the same order as A1111's.
"""

import pytest

from sd.errors import SDError
from sd.prompts import parse_prompt, prompt_chunks
from sd.tokenizer import load_clip_tokenizer

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
