"""Prompts to the CLIP token ids SD 1.5's text encoder reads: 77 per prompt."""

import warnings
from functools import lru_cache

import torch

from ..files import DATA_DIR
from ..errors import counted

CONTEXT_LENGTH = 77  # the text encoder has 77 position embeddings
BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>, also the padding token SD 1.5 was trained with


@lru_cache(maxsize=1)
def load_clip_tokenizer():
    """The BPE tokenizer from the shipped vocabulary; built once, as reading 49k tokens takes a moment."""
    # Imported here: transformers takes seconds to import, which `sd --help` should not pay.
    from transformers import CLIPTokenizer

    # transformers 5: the paths must be positional (as keywords every token becomes id 2),
    # and the context length is not read from the vocabulary files
    return CLIPTokenizer(
        str(DATA_DIR / "vocab.json"), str(DATA_DIR / "merges.txt"), model_max_length=CONTEXT_LENGTH
    )


def encode(prompts: list[str]) -> torch.Tensor:
    """Token ids (B, 77): bos, the prompt's tokens, eos, then eos as padding; too long prompts are cut."""
    # verbose=False: we warn about long prompts ourselves, naming what is dropped
    token_ids = load_clip_tokenizer()(prompts, verbose=False).input_ids
    rows = [fit_to_context(prompt, ids) for prompt, ids in zip(prompts, token_ids)]
    return torch.tensor(rows, dtype=torch.long)  # (B, 77)


def fit_to_context(prompt: str, ids: list[int]) -> list[int]:
    """Cut `ids` (bos ... eos) to 77, keeping the final eos, or pad them with eos up to 77."""
    if len(ids) > CONTEXT_LENGTH:
        dropped = len(ids) - CONTEXT_LENGTH
        warnings.warn(
            f"prompt has {len(ids) - 2} tokens but CLIP reads at most {CONTEXT_LENGTH - 2}: "
            f"the last {counted(dropped, 'token')} {'is' if dropped == 1 else 'are'} ignored ({prompt[:40]!r}...)",
            stacklevel=3,
        )
        ids = ids[: CONTEXT_LENGTH - 1] + [EOS_ID]
    return ids + [EOS_ID] * (CONTEXT_LENGTH - len(ids))
