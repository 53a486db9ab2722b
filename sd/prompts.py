"""Prompts as AUTOMATIC1111 ("A1111") reads them: emphasis, BREAK, and prompts longer than CLIP's 75 tokens.

- Emphasis: `(words)` weighs the words' token vectors 1.1 times, `[words]` 1/1.1 times, `(words:1.5)` 1.5 times;
  brackets nest and their factors multiply; a bracket never closed weighs everything after it; `\\(` `\\)` `\\[`
  `\\]` `\\\\` are the characters themselves.
- Chunks: CLIP reads 77 tokens, so the prompt's tokens are cut into chunks of 75, each wrapped in the start and
  end tokens and padded with the end token. A chunk that would be cut at most 20 tokens after a comma is cut
  after that comma instead, so the words after it stay together; `BREAK` starts a new chunk.
- Encoding: each chunk through CLIP on its own; the chunks' vectors one after another, (1, 77k, 768).

The rules are A1111's (its `parse_prompt_attention`, `tokenize_line`, `sd_emphasis`), written here from their
description, with their quirks, so that an A1111 prompt gives A1111's conditioning.
"""

import logging
import re
from typing import TYPE_CHECKING

import torch

from .errors import SDError
from .tokenizer import BOS_ID, EOS_ID, load_clip_tokenizer

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger("sd")

# ours -> A1111's name in its settings and infotext ("Emphasis: No norm")
EMPHASIS_MODES = {"original": "Original", "no-norm": "No norm", "ignore": "Ignore", "none": "None"}
BREAK = ("BREAK", -1.0)  # the marker parse_prompt puts where BREAK starts a new chunk
ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1  # multiplied, as A1111 does, rather than divided: the weights are its floats exactly
CHUNK_TOKENS = 75  # 77 less the start and end tokens
COMMA_ID = 267  # ",</w>"
COMMA_BACKTRACK = 20  # A1111's "prompt word wrap length limit", default 20

# One piece of a prompt, tried in this order at each position.
EMPHASIS_SYNTAX = re.compile(
    r"""
    \\[()\[\]\\]             # an escaped bracket or backslash: the character itself
  | \\                       # any other backslash: dropped
  | \( | \[
  | :\s*([+-]?[.\d]+)\s*\)   # the weight that closes a round bracket
  | \) | ]
  | [^\\()\[\]:]+            # plain text
  | :
""",
    re.VERBOSE,
)
BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt(text: str) -> list[tuple[str, float]]:
    """The prompt's pieces of text and their weights, neighbours of equal weight merged; BREAK as ("BREAK", -1).

    >>> parse_prompt("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    fragments: list[list] = []  # [text, weight], weighed again as brackets close
    round_open, square_open = [], []  # where each open bracket's fragments start

    def weigh_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in EMPHASIS_SYNTAX.finditer(text):
        piece, weight = match[0], match[1]
        if piece.startswith("\\"):
            fragments.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(fragments))
        elif piece == "[":
            square_open.append(len(fragments))
        elif weight is not None and round_open:
            weigh_from(round_open.pop(), read_weight(weight, match.start(1)))
        elif piece == ")" and round_open:
            weigh_from(round_open.pop(), ROUND_FACTOR)
        elif piece == "]" and square_open:
            weigh_from(square_open.pop(), SQUARE_FACTOR)
        else:  # text, and brackets that close nothing
            fragments.extend(split_at_breaks(piece))
    # brackets never closed weigh everything after them
    for start in round_open:
        weigh_from(start, ROUND_FACTOR)
    for start in square_open:
        weigh_from(start, SQUARE_FACTOR)
    return merge_equal_weights(fragments or [["", 1.0]])


def read_weight(text: str, position: int) -> float:
    try:
        return float(text)
    except ValueError:
        raise SDError(f"the prompt's weight {text!r} at character {position + 1} is not a number: write one such as (word:1.2)") from None


def split_at_breaks(text: str) -> list[list]:
    """[text, 1.0] fragments with a BREAK marker between the parts of `text` around each word BREAK."""
    fragments = []
    for index, part in enumerate(BREAK_WORD.split(text)):
        if index:
            fragments.append(list(BREAK))
        fragments.append([part, 1.0])
    return fragments


def merge_equal_weights(fragments: list[list]) -> list[tuple[str, float]]:
    merged = [fragments[0]]
    for text, weight in fragments[1:]:
        if weight == merged[-1][1]:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]


def prompt_chunks(text: str, emphasis: str = "original") -> list[tuple[list[int], list[float]]]:
    """The prompt as CLIP reads it: chunks of 77 token ids (start, 75 tokens padded with the end token, end) and
    the weight of each. The empty prompt is one chunk. With emphasis "none" the brackets are plain text."""
    fragments = [(text, 1.0)] if emphasis == "none" else parse_prompt(text)
    # each fragment on its own, so that no token spans two weights
    token_lists = load_clip_tokenizer()([fragment for fragment, _ in fragments], truncation=False, add_special_tokens=False).input_ids
    chunker = Chunker()
    for fragment, tokens in zip(fragments, token_lists):
        if fragment == BREAK:
            chunker.close()
            continue
        for token in tokens:
            chunker.add(token, fragment[1])
    if chunker.ids or not chunker.chunks:
        chunker.close()
    return chunker.chunks


class Chunker:
    """Fills chunks of 75 tokens one token at a time, as A1111 does."""

    def __init__(self):
        self.chunks: list[tuple[list[int], list[float]]] = []
        self.ids, self.weights, self.last_comma = [], [], -1

    def add(self, token: int, weight: float) -> None:
        if token == COMMA_ID:
            self.last_comma = len(self.ids)
        elif len(self.ids) == CHUNK_TOKENS and self.last_comma != -1 and CHUNK_TOKENS - self.last_comma <= COMMA_BACKTRACK:
            # the full chunk ends at its last comma, and the words after it begin the next chunk together
            cut = self.last_comma + 1
            moved = self.ids[cut:], self.weights[cut:]
            del self.ids[cut:], self.weights[cut:]
            self.close()
            self.ids, self.weights = moved
        if len(self.ids) == CHUNK_TOKENS:
            self.close()
        self.ids.append(token)
        self.weights.append(weight)

    def close(self) -> None:
        """Ends the chunk (even an empty one): wrapped in start and end tokens, padded to 77, padding weighing 1."""
        padding = CHUNK_TOKENS - len(self.ids)
        ids = [BOS_ID, *self.ids] + [EOS_ID] * (padding + 1)
        weights = [1.0, *self.weights] + [1.0] * (padding + 1)
        self.chunks.append((ids, weights))
        self.ids, self.weights, self.last_comma = [], [], -1
