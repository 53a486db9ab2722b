"""Prompts as AUTOMATIC1111 ("A1111") reads them: emphasis, BREAK, and prompts longer than CLIP's 75 tokens.

- Emphasis: `(words)` weighs the words' token vectors 1.1 times, `[words]` 1/1.1 times, `(words:1.5)` 1.5 times;
  brackets nest and their factors multiply; a bracket never closed weighs everything after it; `\\(` `\\)` `\\[`
  `\\]` `\\\\` are the characters themselves.
- Chunks: CLIP reads 77 tokens, so the prompt's tokens are cut into chunks of 75, each wrapped in the start and
  end tokens and padded with the end token. A chunk that would be cut at most 20 tokens after a comma is cut
  after that comma instead, so the words after it stay together; `BREAK` starts a new chunk.
- Textual inversion: an embedding's trigger word (sd/prompts/embeddings.py) stands for its vectors, one placeholder token
  each, weighed as the word; they never span two chunks, and replace the placeholders' token vectors.
- Encoding: each chunk through CLIP on its own; the chunks' vectors one after another, (1, 77k, 768).

The rules are A1111's (its `parse_prompt_attention`, `tokenize_line`, `sd_emphasis`), written here from their
description, with their quirks, so that an A1111 prompt gives A1111's conditioning.
"""

import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

import torch

from .embeddings import Embedding, Triggers
from ..errors import SDError
from ..files.lora import prompt_text
from .editing import Timeline, prompt_schedule
from .tokenizer import BOS_ID, EOS_ID, load_clip_tokenizer

if TYPE_CHECKING:
    from ..settings import Settings

log = logging.getLogger("sd")

# ours -> A1111's name in its settings and infotext ("Emphasis: No norm")
EMPHASIS_MODES = {"original": "Original", "no-norm": "No norm", "ignore": "Ignore", "none": "None"}
BREAK = ("BREAK", -1.0)  # the marker parse_prompt puts where BREAK starts a new chunk
ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1  # multiplied, as A1111 does, rather than divided: the weights are its floats exactly
CHUNK_TOKENS = 75  # 77 less the start and end tokens
COMMA_ID = 267  # ",</w>"
COMMA_BACKTRACK = 20  # A1111's "prompt word wrap length limit", default 20
PLACEHOLDER_ID = 0  # A1111's token where an embedding's vector goes ("!", read as such only in its quirk below)

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
        raise SDError(f"weight {text!r} at character {position + 1} is not a number: write one such as (word:1.2)") from None


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


def prompt_chunks(text: str, emphasis: str = "original", embeddings: Mapping[str, Embedding] | None = None) -> list[tuple[list[int], list[float]]]:
    """The prompt as CLIP reads it: chunks of 77 token ids (start, 75 tokens padded with the end token, end) and
    the weight of each. The empty prompt is one chunk. With emphasis "none" the brackets are plain text. Each
    embedding's trigger word becomes one placeholder per vector (see chunk_prompt)."""
    return chunk_prompt(text, emphasis, embeddings)[0]


class Placement(NamedTuple):
    """Where an embedding's vectors go: chunk `chunk`, positions `position` to `position + n - 1` of its 77."""

    chunk: int
    position: int
    embedding: Embedding


def chunk_prompt(text: str, emphasis: str = "original", embeddings: Mapping[str, Embedding] | None = None) -> tuple[list[tuple[list[int], list[float]]], list[Placement]]:
    """prompt_chunks(), and where the embeddings' vectors go: A1111's textual inversion. Each trigger word
    (its tokens, within one fragment; the longest where triggers overlap) becomes a placeholder token per
    vector, weighed as its fragment; an embedding that would not fit in the chunk's 75 tokens starts the next."""
    fragments = [(text, 1.0)] if emphasis == "none" else parse_prompt(text)
    # each fragment on its own, so that no token spans two weights
    token_lists = load_clip_tokenizer()([fragment for fragment, _ in fragments], truncation=False, add_special_tokens=False).input_ids
    triggers = Triggers(embeddings or {})
    chunker = Chunker()
    for fragment, tokens in zip(fragments, token_lists):
        if fragment == BREAK:
            chunker.close()
            continue
        start = 0
        while start < len(tokens):
            embedding, length = triggers.match(tokens, start) or (None, 1)
            if embedding is None:
                chunker.add(tokens[start], fragment[1])
            else:
                chunker.add_embedding(embedding, tokens[start], fragment[1])
            start += length
    if chunker.ids or not chunker.chunks:
        chunker.close()
    return chunker.chunks, chunker.placements


class Chunker:
    """Fills chunks of 75 tokens one token (or one embedding) at a time, as A1111 does."""

    def __init__(self):
        self.chunks: list[tuple[list[int], list[float]]] = []
        self.placements: list[Placement] = []
        self.ids, self.weights, self.last_comma = [], [], -1

    def add(self, token: int, weight: float) -> None:
        self.make_room(token)
        self.ids.append(token)
        self.weights.append(weight)

    def add_embedding(self, embedding: Embedding, first_token: int, weight: float) -> None:
        """The embedding's vectors as placeholders, in a new chunk where they would not fit in this one."""
        self.make_room(first_token)
        count = len(embedding.vectors)
        if len(self.ids) + count > CHUNK_TOKENS:
            self.close()
        self.placements.append(Placement(len(self.chunks), 1 + len(self.ids), embedding))  # 1: after the start token
        self.ids += [PLACEHOLDER_ID] * count
        self.weights += [weight] * count

    def make_room(self, token: int) -> None:
        """Before `token` (an embedding's: its trigger's first) is added: remembers a comma, or closes a full chunk
        at its last comma, at most 20 tokens back, or else where it is."""
        if token == COMMA_ID:
            self.last_comma = len(self.ids)
        elif len(self.ids) == CHUNK_TOKENS and self.last_comma != -1 and CHUNK_TOKENS - self.last_comma <= COMMA_BACKTRACK:
            # the full chunk ends at its last comma, and the words after it begin the next chunk together. As in
            # A1111, an embedding placed among them stays where it was (A1111 moves the tokens, not their "fixes"):
            # its vectors take the padding of the closed chunk, and its placeholders go on as the token "!".
            cut = self.last_comma + 1
            moved = self.ids[cut:], self.weights[cut:]
            del self.ids[cut:], self.weights[cut:]
            self.close()
            self.ids, self.weights = moved
        if len(self.ids) == CHUNK_TOKENS:
            self.close()

    def close(self) -> None:
        """Ends the chunk (even an empty one): wrapped in start and end tokens, padded to 77, padding weighing 1."""
        padding = CHUNK_TOKENS - len(self.ids)
        ids = [BOS_ID, *self.ids] + [EOS_ID] * (padding + 1)
        weights = [1.0, *self.weights] + [1.0] * (padding + 1)
        self.chunks.append((ids, weights))
        self.ids, self.weights, self.last_comma = [], [], -1


def encode_prompt(models: dict, text: str, clip_skip: int = 1, emphasis: str = "original", dtype: torch.dtype | None = None,
                  embeddings: Mapping[str, Embedding] | None = None) -> torch.Tensor:
    """The context the U-Net attends to, (1, 77k, 768): each of the prompt's k chunks through the text encoder
    (models["clip"], on its own device; in `dtype`, by default its weights'), emphasis applied, one after another.
    `embeddings` (sd/prompts/embeddings.py): their trigger words in the text stand for their vectors."""
    if emphasis not in EMPHASIS_MODES:
        raise SDError(f"unknown emphasis {emphasis!r}: choose one of {', '.join(EMPHASIS_MODES)}")
    return encode_chunks(models["clip"], *chunk_prompt(text, emphasis, embeddings), clip_skip, emphasis, dtype)


def encode_chunks(clip: torch.nn.Module, chunks: list, placements: list[Placement], clip_skip: int, emphasis: str, dtype: torch.dtype | None) -> torch.Tensor:
    """encode_prompt() of a prompt's chunks and its embeddings' placements (chunk_prompt)."""
    device = clip.position_embedding.device
    tokens = torch.tensor([ids for ids, _ in chunks], device=device)  # (k, 77)
    inputs = token_vectors(clip, tokens, placements, dtype) if placements else None
    warn_unknown_words(clip, tokens, placements)
    # (k, 77) -> (k, 77, 768): the chunks are independent, so one batch computes each as if alone
    vectors = clip(tokens, dtype, clip_skip=clip_skip, token_vectors=inputs)
    weights = torch.tensor([weights for _, weights in chunks], device=device)  # (k, 77)
    vectors = apply_emphasis(vectors, weights, emphasis)
    return vectors.reshape(1, -1, vectors.shape[-1])  # (k, 77, 768) -> (1, 77k, 768)


def token_vectors(clip: torch.nn.Module, tokens: torch.Tensor, placements: list[Placement], dtype: torch.dtype | None) -> torch.Tensor:
    """The chunks' token vectors with each placed embedding's vectors over its placeholders, as A1111 puts them:
    before the position embeddings are added. (k, 77) -> (k, 77, 768)."""
    vectors = clip.embed(tokens, dtype)
    for chunk, position, embedding in placements:
        if embedding.vectors.shape[1] != vectors.shape[2]:
            raise SDError(f"embedding {embedding.name} has vectors {embedding.vectors.shape[1]} wide, but this model's text encoder takes "
                          f"{vectors.shape[2]}: it is for another model; leave {embedding.name} out of the prompt")
        vectors[chunk, position : position + len(embedding.vectors)] = embedding.vectors.to(vectors)  # (n, 768)
    return vectors


def apply_emphasis(vectors: torch.Tensor, weights: torch.Tensor, emphasis: str) -> torch.Tensor:
    """Each token's vector (k chunks, 77, 768) times its weight (k, 77), as A1111's emphasis modes do: "original"
    then scales each chunk back to its mean before the weights (over all its 77 x 768 values, start and padding
    included), "no-norm" does not; "ignore" and "none" leave the vectors as they are (for "none" the brackets
    were text). In fp64: the mean of CLIP's vectors is near 0 (their sum cancels), so an fp32 sum of the 59,136
    values would lose about 1e-5 of the result, depending on the order in which it adds them."""
    if emphasis in ("ignore", "none"):
        return vectors
    plain = vectors.double()
    weighted = plain * weights[..., None]  # (k, 77, 768) * (k, 77, 1)
    if emphasis == "original":
        weighted = weighted * (plain.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True))
    return weighted.to(vectors.dtype)


def guidance_contexts(models: dict, settings: "Settings", num_images: int, guided: bool, timelines: list[Timeline], dtype: torch.dtype | None = None,
                      embeddings: Mapping[str, Embedding] | None = None) -> tuple[list["ContextSchedule"], dict[str, Embedding]]:
    """The context of each sampling pass (one Timeline each: hires fix has two), as the prompt and negative
    prompt read at each of its steps (sd/prompts/editing.py); each distinct text is encoded once, now, while
    the text encoder is loaded, with the `embeddings` it names. And the embeddings placed, by name, in the order
    met: the negative prompt's first (A1111's "TI hashes" name them)."""
    # the prompt's LoRA tags cut, as A1111 cuts them from the prompt alone (sd/files/lora.py)
    texts = [settings.negative_prompt] * guided + [prompt_text(settings.prompt)]
    encodings: dict[str, torch.Tensor] = {}
    used: dict[str, Embedding] = {}

    def encode(text: str) -> torch.Tensor:  # (1, 77k, 768)
        if text not in encodings:
            chunks, placements = chunk_prompt(text, settings.emphasis, embeddings)
            used.update((placement.embedding.name, placement.embedding) for placement in placements)
            encodings[text] = encode_chunks(models["clip"], chunks, placements, settings.clip_skip, settings.emphasis, dtype)
        return encodings[text]

    passes = [[[(end, encode(text)) for end, text in prompt_schedule(text, timeline)] for text in texts] for timeline in timelines]
    lengths = {encoding.shape[1] for encoding in encodings.values()}
    empty = encode("") if len(lengths) > 1 else None
    return [ContextSchedule(schedules, empty, num_images) for schedules in passes], used


class ContextSchedule:
    """The context at each U-Net call of a sampling pass, (2B or B, 77k, 768): the negative prompt's B rows first
    when guided, then the prompt's. Where one of the two has fewer chunks it is padded with the empty prompt's
    encoding, 77 vectors at a time, so that the U-Net runs both halves in one call (A1111's "Pad conds" option;
    by default A1111 runs the two halves apart, which gives other images when the lengths differ)."""

    def __init__(self, schedules: list[list[tuple[int, torch.Tensor]]], empty: torch.Tensor | None, num_images: int):
        self.schedules, self.empty, self.num_images = schedules, empty, num_images
        self.last: tuple[tuple, torch.Tensor] | None = None  # the chosen encodings' ids and their context

    def __call__(self, call: int) -> torch.Tensor:
        """The context of U-Net call `call` (from 0): each half's first text whose last step is at least `call`."""
        halves = [next((encoding for end, encoding in schedule if call <= end), schedule[-1][1]) for schedule in self.schedules]
        key = tuple(map(id, halves))
        if self.last is None or self.last[0] != key:
            self.last = key, self.combine(halves)
        return self.last[1]

    def combine(self, halves: list[torch.Tensor]) -> torch.Tensor:
        longest = max(half.shape[1] for half in halves)
        # (1, 77j, 768) -> (1, 77k, 768)
        halves = [half if half.shape[1] == longest else self.padded(half, longest) for half in halves]
        # (1, 77k, 768) each -> (2B or B, 77k, 768)
        return torch.cat([half.expand(self.num_images, -1, -1) for half in halves])

    def padded(self, encoding: torch.Tensor, length: int) -> torch.Tensor:
        """(1, 77j, 768) -> (1, length, 768) with the empty prompt's encoding."""
        return torch.cat([encoding, *[self.empty] * ((length - encoding.shape[1]) // self.empty.shape[1])], dim=1)


def warn_unknown_words(clip: torch.nn.Module, tokens: torch.Tensor, placements: list[Placement]) -> None:
    """A text encoder that keeps only some tokens (the demo model's) reads the others as padding: say which
    (but for the placeholders of embeddings, whose vectors replace them)."""
    read = torch.ones_like(tokens, dtype=torch.bool)  # (k, 77)
    for chunk, position, embedding in placements:
        read[chunk, position : position + len(embedding.vectors)] = False
    unknown = clip.unknown_tokens(tokens[read])
    if unknown:
        words = load_clip_tokenizer().convert_ids_to_tokens(unknown)
        log.warning("the model does not know these words and ignores them: %s", ", ".join(word.removesuffix("</w>") for word in words))
