"""Textual-inversion embeddings: vectors learnt for a new word, read from a folder of files, as AUTOMATIC1111
("A1111") reads them.

A file's trigger word is its name without the extension (`my-style.pt` is `my-style`, whatever name it holds
inside); where a prompt has the trigger's tokens, the embedding's vectors stand in their place (sd/prompts/conditioning.py).
The files, each one or more vectors of SD 1.5's token width, 768:

- A1111's `.pt` (or `.bin`): {"string_to_param": {"*": (n, 768)}, "name": ..., ...}; old files hold an
  nn.ParameterDict there.
- kohya's `.safetensors` (or `.pt`): {"emb_params": (n, 768)}.
- diffusers' `.bin` or `.safetensors`: {token: (n, 768) or (768,)}.

Pickled files (.pt, .bin) are read with torch.load(weights_only=True): tensors and plain containers, plus
A1111's ParameterDict and nothing else, so a file that would run code is refused before anything in it runs.
An embedding trained for another model (SD 2.x: 1024 wide; SDXL: clip_g and clip_l) is skipped with a warning.
"""

import hashlib
import io
import logging
import pickle
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

from ..errors import SDError
from ..files.converter import refuse_code
from ..files import DATA_DIR
from .tokenizer import load_clip_tokenizer

log = logging.getLogger("sd")

DEFAULT_FOLDER = DATA_DIR / "embeddings"
SUFFIXES = (".pt", ".bin", ".safetensors")
WIDTH = 768  # SD 1.5's token vectors
OTHER_MODELS = {1024: "SD 2.x", 1280: "SDXL"}  # by the width of their vectors
MAX_VECTORS = 75  # a chunk's tokens: an embedding's vectors never span two chunks
FILE_FIX = "remove it from the folder, or replace it with a .safetensors, .pt or .bin embedding"


@dataclass(frozen=True, eq=False)
class Embedding:
    """One embedding: its trigger word, its vectors and the sha256 of its file (A1111's "TI hashes" give 12 digits)."""

    name: str
    vectors: torch.Tensor = field(repr=False)  # (n, 768) float32
    sha256: str

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]


def infotext_name(name: str) -> str:
    """The trigger word as A1111 writes it in "TI hashes": without the commas and colons that would split the field."""
    return re.sub("[,:]", "", name)


def load_embeddings(folder: str | Path | None = None) -> dict[str, Embedding]:
    """The embeddings in `folder` and its subfolders, by trigger word. None: data/embeddings/, where a missing
    folder means no embeddings; a folder given must exist. A file that cannot be read is an SDError naming it."""
    if folder is None:
        if not DEFAULT_FOLDER.is_dir():
            return {}
        folder = DEFAULT_FOLDER
    folder = Path(folder)
    if not folder.is_dir():
        problem = "is a file" if folder.exists() else "does not exist"
        raise SDError(f"embeddings folder {folder} {problem}: give a folder of embeddings to --embeddings")
    embeddings: dict[str, Embedding] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in SUFFIXES or not path.is_file():
            continue
        embedding = read_embedding(path)
        if embedding is None:
            continue
        if embedding.name in embeddings:
            log.warning("embedding %s has the trigger word of an earlier file, which is kept: rename one of them", path)
            continue
        embeddings[embedding.name] = embedding
    return embeddings


def read_embedding(path: Path) -> Embedding | None:
    """The embedding in the file, or None (with a warning) when it is for another model."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SDError(f"cannot read embedding {path} ({error.strerror}): check its permissions, or {FILE_FIX}") from None
    vectors = embedding_vectors(path, read_tensors(path, data))
    if vectors is None:
        return None
    # hashed from the bytes just read, so the hash is that of these vectors, at less cost than reading them
    return Embedding(path.stem, vectors.detach().float(), hashlib.sha256(data).hexdigest())


def read_tensors(path: Path, data: bytes) -> dict:
    """The file's dictionary, read without running any code it may hold."""
    try:
        if path.suffix.lower() == ".safetensors":
            return safetensors.torch.load(data)
        # only A1111's ParameterDict beyond what weights_only allows: it holds the vectors of its old files
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        refuse_code(io.BytesIO(data), path, "an embedding", FILE_FIX, allowed=("torch.nn.modules.container.ParameterDict",))
        raise SDError(f"cannot read embedding {path}: it is damaged or not a PyTorch file; {FILE_FIX}") from None
    except Exception as error:  # a damaged file fails in many ways, each an error of the reader's own
        raise SDError(f"cannot read embedding {path}: it is damaged ({error.__class__.__name__}); {FILE_FIX}") from None
    if not isinstance(loaded, dict):
        raise SDError(f"{path} holds a {type(loaded).__name__}, not an embedding's dictionary: {FILE_FIX}")
    return loaded


def embedding_vectors(path: Path, tensors: dict) -> torch.Tensor | None:
    """The vectors of A1111's, kohya's or diffusers' layout; None (with a warning) for another model's."""
    if "clip_g" in tensors:  # SDXL's two text encoders
        log.warning("skipped embedding %s: it is for SDXL (clip_g and clip_l vectors), not SD 1.5", path)
        return None
    found = tensors.get("string_to_param", tensors)  # A1111's, or kohya's or diffusers' one tensor
    if isinstance(found, torch.nn.ParameterDict):  # A1111's old files
        found = dict(found.items())
    values = list(found.values()) if isinstance(found, dict) else []
    if len(values) != 1 or not isinstance(values[0], torch.Tensor):
        raise SDError(f"{path} is not a textual-inversion embedding (it holds {', '.join(sorted(map(str, tensors))) or 'nothing'}): {FILE_FIX}")
    vectors = values[0]
    if vectors.ndim == 1:  # diffusers' one vector: (768,) -> (1, 768)
        vectors = vectors[None]
    if vectors.ndim != 2 or not 1 <= len(vectors) <= MAX_VECTORS:
        raise SDError(f"embedding {path} has vectors of shape {tuple(vectors.shape)}, not 1 to {MAX_VECTORS} vectors: {FILE_FIX}")
    if vectors.shape[-1] != WIDTH:
        model = OTHER_MODELS.get(vectors.shape[-1], "another model")
        log.warning("skipped embedding %s: its vectors are %d wide, for %s; SD 1.5's are %d", path, vectors.shape[-1], model, WIDTH)
        return None
    return vectors


class Triggers:
    """The embeddings by the token ids of their trigger words, found in a prompt's tokens as A1111 finds them."""

    def __init__(self, embeddings: Mapping[str, Embedding]):
        names = list(embeddings)
        token_lists = load_clip_tokenizer()(names, add_special_tokens=False).input_ids if names else []
        # first token -> [(the trigger's tokens, embedding)], the longest trigger first
        self.by_first: dict[int, list[tuple[list[int], Embedding]]] = defaultdict(list)
        for name, tokens in zip(names, token_lists):
            if tokens:
                self.by_first[tokens[0]].append((tokens, embeddings[name]))
        for candidates in self.by_first.values():
            candidates.sort(key=lambda candidate: -len(candidate[0]))

    def match(self, tokens: list[int], start: int) -> tuple[Embedding, int] | None:
        """The embedding whose trigger's tokens begin at tokens[start] (the longest, where several do), and the
        number of those tokens."""
        for trigger, embedding in self.by_first.get(tokens[start], ()):
            if tokens[start : start + len(trigger)] == trigger:
                return embedding, len(trigger)
        return None
