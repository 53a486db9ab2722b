"""A batch of renders: each job is the Settings of one image and the file it goes to, written whole or not at all."""

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .settings import Settings


@dataclass
class Job:
    """One image to make: its settings (prompt and seed included) and its file."""

    settings: Settings
    path: Path


def save_png(image: Image.Image, path: Path, parameters: str) -> None:
    """Writes a temporary file beside `path` and renames it over, so `path` is never half-written."""
    metadata = PngInfo()
    metadata.add_text("parameters", parameters)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(temporary, format="PNG", pnginfo=metadata)
        os.replace(temporary, path)
    except BaseException:  # a failed write or Ctrl+C: leave no temporary file behind
        temporary.unlink(missing_ok=True)
        raise
