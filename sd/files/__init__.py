"""Reading what users bring: checkpoints and their key names, add-on files, hashes, PNG metadata."""

from pathlib import Path

# the project's data folder: the tokenizer's files, the demo model, and where users put checkpoints, LoRAs, embeddings
DATA_DIR = Path(__file__).resolve().parents[2] / "data"
DEMO_CHECKPOINT = DATA_DIR / "sd-demo.safetensors"
