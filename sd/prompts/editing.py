"""Prompt editing and alternation as AUTOMATIC1111 ("A1111") reads them: the text a prompt has at each step.

- `[from:to:when]` is `from` until step `when`, then `to`; `[to:when]` adds `to` at `when`, `[from::when]` removes
  `from` there. `when` is a step number, or with a decimal point a fraction of the steps (0.5: half way).
- `[a|b|c]` takes a, b, c, a, ... at successive steps.
- They nest, and sit inside emphasis brackets, which stay in the text for sd/prompts/conditioning.py to read.
- A prompt that does not follow these rules (a `|` outside brackets, a trailing lone `\\`) is the same text at
  every step; brackets that match nothing above are text.

Steps are counted as A1111 counts them: as calls of the U-Net, twice per step for a second-order sampler
(Heun), call k (from 0) taking the first text whose last step is at least k. In hires fix's second pass,
a step number counts on from the first pass's steps and a fraction from 1.0 (1.5: half way through the
second pass). The rules are A1111's `prompt_parser` schedules, written from their description.
"""

import re
from dataclasses import dataclass
from functools import lru_cache

NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*]")
PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.DOTALL)


@dataclass(frozen=True)
class Timeline:
    """How a sampling pass counts steps for `when`."""

    steps: int  # the pass's steps in U-Net calls (A1111's "total steps": twice the steps for Heun)
    step_offset: int = 0  # hires fix's second pass: the first pass's total steps
    fraction_offset: float = 0.0  # and 1.0


def prompt_schedule(text: str, timeline: Timeline) -> list[tuple[int, str]]:
    """(last step, text) pairs in order: the text the prompt has up to and including each step.

    >>> prompt_schedule("a [b : c : 1] d", Timeline(10))
    [(1, 'a b  d'), (10, 'a  c  d')]
    """
    parts = parse_schedule(text)
    if parts is None:
        return [(timeline.steps, text)]
    boundaries = {timeline.steps} | set(edit_boundaries(parts, timeline))
    return [(step, text_at(parts, step, timeline)) for step in sorted(boundaries)]


@lru_cache(maxsize=64)
def parse_schedule(text: str) -> tuple | None:
    """The text's parts (str, Edit, Alternation), or None where it does not follow the grammar."""
    try:
        return Parser(text).top()
    except NotAPrompt:
        return None


def edit_step(when: str, timeline: Timeline) -> int:
    """The step at which an edit's `when` ends its `before`: a fraction of the steps if written with a point. Held to
    0..steps, as a step before or past the schedule changes nothing more (and 1e999 reads as infinity)."""
    if "." in when:
        step = (float(when) - timeline.fraction_offset) * timeline.steps
    else:
        step = float(when) - timeline.step_offset
    return int(min(timeline.steps, max(0.0, step)))


def edit_boundaries(parts: tuple, timeline: Timeline):
    """The steps after which the text changes (an alternation's: every step)."""
    for part in parts:
        if isinstance(part, Edit):
            step = edit_step(part.when, timeline)
            if step >= 1:
                yield step
            yield from edit_boundaries(part.before + part.after, timeline)
        elif isinstance(part, Alternation):
            yield from range(1, timeline.steps + 1)
            for option in part.options:
                yield from edit_boundaries(option, timeline)


def text_at(parts: tuple, step: int, timeline: Timeline) -> str:
    """The text at `step` (from 1)."""
    pieces = []
    for part in parts:
        if isinstance(part, Edit):
            part = part.before if step <= edit_step(part.when, timeline) else part.after
        elif isinstance(part, Alternation):
            part = part.options[(step - 1) % len(part.options)]
        pieces.append(part if isinstance(part, str) else text_at(part, step, timeline))
    return "".join(pieces)


@dataclass(frozen=True)
class Edit:
    """`[before:after:when]`; `when` as written."""

    before: tuple
    after: tuple
    when: str


@dataclass(frozen=True)
class Alternation:
    options: tuple  # of sequences


class NotAPrompt(Exception):
    """The text at this position does not follow the grammar."""


class Parser:
    """A recursive descent over the text; a part is a tuple of str, Edit and Alternation."""

    def __init__(self, text: str):
        self.text, self.at = text, 0

    def next_char(self) -> str:
        char = self.text[self.at : self.at + 1]
        self.at += 1
        return char

    def top(self) -> tuple:
        """The whole text. Only here may a bracket or colon be plain text, where it opens nothing valid."""
        parts = []
        while self.at < len(self.text):
            match = PLAIN.match(self.text, self.at)
            if match:
                parts.append(match[0])
                self.at = match.end()
                continue
            start = self.at
            if self.text[start] in "[(":
                try:
                    parts.extend(self.bracket())
                    continue
                except NotAPrompt:
                    self.at = start
            if self.text[start] not in "[]():":  # | and a lone backslash are nowhere text
                raise NotAPrompt
            parts.append(self.next_char())
        return tuple(parts)

    def sequence(self) -> list:
        """Plain text and bracket forms, up to a character that ends them: ) ] : | or the end."""
        parts = []
        while True:
            match = PLAIN.match(self.text, self.at)
            if match:
                parts.append(match[0])
                self.at = match.end()
            elif self.text[self.at : self.at + 1] in ("[", "("):
                parts.extend(self.bracket())
            else:
                return parts

    def bracket(self) -> list:
        """An emphasis bracket (kept as text), an edit or an alternation, from its ( or [."""
        opening = self.next_char()
        first = self.sequence()
        char = self.next_char()
        if opening == "(" and char == ")":
            return ["(", *first, ")"]
        if opening == "(" and char == ":":
            weight = self.sequence()
            if self.next_char() == ")":
                return ["(", *first, ":", *weight, ")"]
        if opening == "[" and char == "]":
            return ["[", *first, "]"]
        if opening == "[" and char == "|":
            return [self.alternation(first)]
        if opening == "[" and char == ":":
            return [self.edit(first)]
        raise NotAPrompt

    def alternation(self, first: list) -> Alternation:
        """After `[first|`: more options, each possibly empty, up to the closing bracket."""
        options = [tuple(first)]
        while True:
            options.append(tuple(self.sequence()))
            char = self.next_char()
            if char == "]":
                return Alternation(tuple(options))
            if char != "|":
                raise NotAPrompt

    def edit(self, first: list) -> Edit:
        """After `[first:`: `when]` (first is then what is added), or `after:when]`."""
        number = NUMBER.match(self.text, self.at)
        if number is None:
            after = self.sequence()
            number = NUMBER.match(self.text, self.at) if self.next_char() == ":" else None
            if number is None:
                raise NotAPrompt
        else:
            first, after = [], first
        self.at = number.end()
        return Edit(tuple(first), tuple(after), number[1])
