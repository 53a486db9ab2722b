"""CLIP ViT-L/14 text encoder: token ids -> the context the U-Net attends to."""

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from .attention import SelfAttention
from ..errors import SDError
from .layers import LayerNorm, Linear
from ..prompts.tokenizer import EOS_ID


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408
    max_tokens: int = 77
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    # A model trained on a few words may keep the embeddings of those tokens only: the CLIP token id of each
    # row. Any other token is read as the end-of-text token, the padding (see CLIP.rows).
    token_ids: tuple[int, ...] | None = None


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # The sigmoid approximation of GELU that OpenAI trained CLIP with.
    return x * torch.sigmoid(1.702 * x)


class CLIPLayer(nn.Module):
    """Pre-norm transformer layer: causal self-attention, then a 4x MLP."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.layer_norm1 = LayerNorm(width)
        self.attention = SelfAttention(width, num_heads)
        self.layer_norm2 = LayerNorm(width)
        self.fc1 = Linear(width, 4 * width)
        self.fc2 = Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 77, 768) throughout
        x = x + self.attention(self.layer_norm1(x), causal=True)
        # (B, 77, 768) -> (B, 77, 3072) -> (B, 77, 768)
        return x + self.fc2(quick_gelu(self.fc1(self.layer_norm2(x))))


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig = CLIPConfig()):
        super().__init__()
        self.config = config
        # Plain parameters rather than nn.Embedding, whose initialiser (run even on the meta device)
        # imports torch._dynamo: 1.6 s of every load.
        self.token_embedding = nn.Parameter(torch.empty(config.vocab_size, config.width))
        self.position_embedding = nn.Parameter(torch.empty(config.max_tokens, config.width))
        self.layers = nn.ModuleList(CLIPLayer(config.width, config.num_heads) for _ in range(config.num_layers))
        self.final_layer_norm = LayerNorm(config.width)

    def forward(self, tokens: torch.Tensor, dtype: torch.dtype | None = None, clip_skip: int = 1, token_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """`dtype`: the type to compute in (see sd/models/layers.py); by default that of the weights. `clip_skip`: 1 reads
        the last layer's output, n the output of the n-th layer from the end, through the final layer norm all
        the same (AUTOMATIC1111's "Clip skip": what some SD 1.5 fine-tunes were trained on). `token_vectors`
        (B, 77, 768): read instead of the tokens' embeddings (textual inversion puts its vectors among them)."""
        if not 1 <= clip_skip <= len(self.layers):
            raise SDError(f"clip skip must be between 1 and {len(self.layers)}, the text encoder's layers, got {clip_skip}: "
                          f"give at most {len(self.layers)} with this checkpoint")
        dtype = dtype or self.position_embedding.dtype
        x = token_vectors.to(dtype) if token_vectors is not None else self.embed(tokens, dtype)  # (B, 77) -> (B, 77, 768)
        x = x + self.position_embedding[: tokens.shape[1]].to(dtype)
        for layer in self.layers[: len(self.layers) - (clip_skip - 1)]:
            x = layer(x)
        return self.final_layer_norm(x)

    def embed(self, tokens: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tokens' embeddings, (B, 77) -> (B, 77, 768), in `dtype` (by default the weights'): a new tensor."""
        return self.token_embedding[self.rows(tokens)].to(dtype or self.position_embedding.dtype)

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embedding row of each CLIP token id: the id itself, unless the model keeps only some tokens."""
        if self.config.token_ids is None:
            return tokens
        return token_rows(self.config.token_ids).to(tokens.device)[tokens]

    def unknown_tokens(self, tokens: torch.Tensor) -> list[int]:
        """The token ids among `tokens` that the model has no embedding of (read as padding)."""
        if self.config.token_ids is None:
            return []
        return sorted(set(tokens.flatten().tolist()) - set(self.config.token_ids))


@lru_cache(maxsize=4)
def token_rows(token_ids: tuple[int, ...]) -> torch.Tensor:
    """(49408,) the row of each CLIP token id among `token_ids`, that of end-of-text for the others."""
    rows = torch.full((CLIPConfig.vocab_size,), token_ids.index(EOS_ID), dtype=torch.long)
    rows[list(token_ids)] = torch.arange(len(token_ids))
    return rows
