"""Reading what users bring: checkpoints and their key names, add-on files, hashes, PNG metadata."""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]
# the project's data folder: the tokenizer's files, the demo model, and where users put checkpoints, LoRAs, embeddings.
# data/ beside sd/ in a checkout (and an editable install); an installed wheel carries it as sd/data (pyproject.toml)
DATA_DIR = _PACKAGE.parent / "data" if (_PACKAGE.parent / "data" / "vocab.json").is_file() else _PACKAGE / "data"
DEMO_CHECKPOINT = DATA_DIR / "sd-demo.safetensors"
