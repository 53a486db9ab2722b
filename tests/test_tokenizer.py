"""Token ids against the reference CLIP tokenizer's ids in tests/fixtures/tokenizer_cases.json."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from sd.prompts.tokenizer import encode

CASES = json.loads((Path(__file__).parent / "fixtures" / "tokenizer_cases.json").read_text())["cases"]
BOS, EOS = 49406, 49407


def to_context(ids: list[int]) -> list[int]:
    """The reference ids as SD 1.5 feeds them: cut to 77 keeping the final eos, padded with eos."""
    ids = ids[:76] + [EOS] if len(ids) > 77 else ids
    return ids + [EOS] * (77 - len(ids))


@pytest.mark.parametrize("case", CASES, ids=lambda case: case["prompt"][:30])
def test_ids_equal_reference(case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one long case warns; tested below
        ids = encode([case["prompt"]])
    assert ids.dtype == torch.long
    assert ids.tolist() == [to_context(case["ids"])]


def test_batch_equals_reference():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = encode([case["prompt"] for case in CASES])
    assert ids.shape == (len(CASES), 77)
    assert ids.tolist() == [to_context(case["ids"]) for case in CASES]


def test_long_prompt_warns_and_keeps_final_eos():
    long_case = next(case for case in CASES if len(case["ids"]) > 77)
    dropped = len(long_case["ids"]) - 77
    with pytest.warns(UserWarning, match=f"last {dropped} tokens"):
        ids = encode([long_case["prompt"]])[0]
    assert ids[76] == EOS
    assert ids[:76].tolist() == long_case["ids"][:76]


def test_short_prompt_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode(["a dog with glasses"])


def test_empty_prompt_is_bos_then_eos():
    assert encode([""]).tolist() == [[BOS] + [EOS] * 76]
