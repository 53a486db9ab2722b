"""Prompt editing and alternation (sd/prompts/editing.py) and the context each U-Net call gets from them.

Cases marked "A1111" are the worked cases of A1111's docstrings and the quirks checked by running its code
(shared reference a1111-formats.md, section 1 and its last section); the others are ours, worked out by hand
from the rules there.
"""

import pytest
import torch

from sd import generate
from sd.pipeline import pass_timelines
from sd.prompts.editing import Timeline, prompt_schedule
from sd.prompts.conditioning import encode_prompt
from sd.sampling.samplers import total_steps
from sd.settings import Settings

SCHEDULE_CASES = {
    # A1111's docstring cases, at 10 steps
    "a [b : c : 1] d": [(1, "a b  d"), (10, "a  c  d")],
    "a[b:[c:d:2]:1]e": [(1, "abe"), (2, "ace"), (10, "ade")],
    "[fe|||]male": [(step, "female" if step % 4 == 1 else "male") for step in range(1, 11)],
    # A1111's quirks: not parsed (so the text at every step); a fraction of 1.0 is the end
    "a [{b|d{:.5] c": [(10, "a [{b|d{:.5] c")],
    "[a:b:1.0]": [(10, "a")],
    # ours: the short forms, fractions, spaces around the number
    "[cat:dog:0.5]": [(5, "cat"), (10, "dog")],
    "a [hat:3]": [(3, "a "), (10, "a hat")],
    "a [hat::3]": [(3, "a hat"), (10, "a ")],
    "[a: 1 b:2]": [(2, "a"), (10, " 1 b")],
    "[a:b: 4 ]": [(4, "a"), (10, "b")],
    "[a:b:.25]": [(2, "a"), (10, "b")],
    # a step of 0 or less never comes; one past the end is the end
    "[a:b:0]": [(10, "b")],
    "[a:b:-3]": [(10, "b")],
    "[a:b:15]": [(10, "a")],
    # numbers too large for a float read as infinity: past the end, or before the start (an OverflowError before)
    "[a:b:1e999]": [(10, "a")],
    "[a:b:1.5e999]": [(10, "a")],
    "[a:b:-1e999]": [(10, "b")],
    # edits inside emphasis, and emphasis inside edits, keep the emphasis brackets for parse_prompt
    "([a:b:3]:1.2)": [(3, "(a:1.2)"), (10, "(b:1.2)")],
    "[(red:1.3):[blue]:7]": [(7, "(red:1.3)"), (10, "[blue]")],
    "[red|(blue:0.8)] x": [(step, ("red x", "(blue:0.8) x")[(step - 1) % 2]) for step in range(1, 11)],
    "[a|]": [(step, ("a", "")[(step - 1) % 2]) for step in range(1, 11)],
    # text: brackets that match no form at the top level, escapes, a weight with two points (refused later)
    "[a:b]": [(10, "[a:b]")],
    "([a:b:3]": [(3, "(a"), (10, "(b")],  # a stray bracket beside an edit
    "x ] y ) :": [(10, "x ] y ) :")],
    "\\[a:b:3\\]": [(10, "\\[a:b:3\\]")],
    "(a:1.2.3)": [(10, "(a:1.2.3)")],
    # not the grammar: the whole text at every step
    "a | b [c:d:2]": [(10, "a | b [c:d:2]")],
    "[c:d:2] x\\": [(10, "[c:d:2] x\\")],
    "": [(10, "")],
}


@pytest.mark.parametrize("text, expected", SCHEDULE_CASES.items(), ids=list(SCHEDULE_CASES))
def test_prompt_schedule(text, expected):
    assert prompt_schedule(text, Timeline(10)) == expected


@pytest.mark.parametrize("text, expected", [
    ("[a:b:25]", [(5, "a"), (10, "b")]),  # step 25 of 20 + 10
    ("[a:b:1.5]", [(5, "a"), (10, "b")]),  # half way through the second pass
    ("[a:b:0.5]", [(10, "b")]),  # done in the first pass
    ("[a:b:12]", [(10, "b")]),
])
def test_hires_pass_counts_steps_on_from_the_first_pass(text, expected):
    first, hires = pass_timelines(Settings(text, steps=20, hires_scale=2, hires_steps=10))
    assert (first, hires) == (Timeline(20), Timeline(10, step_offset=20, fraction_offset=1.0))
    assert prompt_schedule(text, hires) == expected


def test_a_second_order_sampler_counts_two_steps_for_each():
    assert [total_steps(name, 10) for name in ("heun", "euler", "dpmpp_2m", "ddim")] == [20, 10, 10, 10]
    first, hires = pass_timelines(Settings("x", steps=10, sampler="euler", hires_scale=2, hires_sampler="heun"))
    assert (first.steps, hires.steps, hires.step_offset) == (10, 20, 10)


# The U-Net's calls on the demo model: the context each gets, and how many texts are encoded


@pytest.fixture
def unet_contexts(demo):
    """The context of each U-Net call, recorded."""
    contexts = []
    hook = demo["diffusion"].register_forward_pre_hook(lambda module, args: contexts.append(args[1].clone()))
    yield contexts
    hook.remove()


def prompt_of_each_call(demo, contexts: list[torch.Tensor], texts: list[str]) -> list[str]:
    """Which of `texts` each context's prompt half (the last row) is the encoding of."""
    with torch.inference_mode():  # in the dtype the render computed in
        encodings = {text: encode_prompt(demo, text, dtype=contexts[0].dtype)[0] for text in texts}
    return [next(text for text, encoding in encodings.items() if torch.equal(context[-1], encoding)) for context in contexts]


@pytest.mark.parametrize("sampler, steps, prompt, expected", [
    # A1111's count: call k (from 0) takes the first text whose last step is at least k, so `red` to call 2
    ("euler", 4, "[red circle:blue square:2]", ["red circle"] * 3 + ["blue square"]),
    # Heun's 3 steps are 5 calls, counted as 6 steps: half way is 3
    ("heun", 3, "[red circle:blue square:0.5]", ["red circle"] * 4 + ["blue square"]),
    ("ddim", 5, "[red|blue] circle", ["red circle", "red circle", "blue circle", "red circle", "blue circle"]),
])
def test_each_unet_call_gets_its_steps_prompt(demo, unet_contexts, sampler, steps, prompt, expected):
    generate(prompt, models=demo, steps=steps, sampler=sampler, seed=0, progress=False)
    assert prompt_of_each_call(demo, unet_contexts, sorted(set(expected))) == expected


def test_hires_fix_edits_on_in_its_second_pass(demo, unet_contexts):
    # first pass: 2 steps, the edit at 3 is beyond them; second pass: step 3 is its step 1, so calls 0 and 1 keep red
    generate("[red circle:blue square:3]", models=demo, steps=2, seed=0, hires_scale=1.5, hires_steps=3, progress=False)
    expected = ["red circle"] * 2 + ["red circle"] * 2 + ["blue square"]
    assert prompt_of_each_call(demo, unet_contexts, ["red circle", "blue square"]) == expected


def test_each_distinct_text_is_encoded_once(demo):
    encoded = []
    hook = demo["clip"].register_forward_pre_hook(lambda module, args: encoded.append(len(args[0])))
    try:
        generate("a [red|blue|red] circle", negative_prompt="[x:y:3]", models=demo, steps=6, sampler="euler", seed=0, progress=False)
    finally:
        hook.remove()
    assert len(encoded) == 4  # "a red circle", "a blue circle", "x", "y": one chunk each
