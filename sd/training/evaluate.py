"""Judges the demo model by rules: renders every colour/shape/position caption (trained and held-out) with
several seeds and the command's default sampler, reads colour, shape and position back off each image
(world.read_image) and prints how often each is right, with CFG 7.5 and with CFG 1. Writes a labelled grid and
the figures as JSON.

`python -m sd.training.evaluate` (or `make eval-demo`).
"""

import argparse
import json
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..files.loader import load_models
from ..pipeline import DEMO_CHECKPOINT, generate
from ..settings import COMMAND_DEFAULTS
from .world import COLOURS, POSITIONS, SHAPES, Reading, Scene, combinations, read_image

ATTRIBUTES = ("colour", "shape", "position")
GRID_SCALE = 2  # each 64x64 image drawn at 128x128
LABEL_WIDTH = 190


@dataclass(frozen=True)
class Render:
    scene: Scene
    held_out: bool
    cfg: float
    noise: int  # which starting noise: the same for every caption
    image: Image.Image

    @cached_property
    def reading(self) -> Reading:
        return read_image(np.asarray(self.image))

    def correct(self) -> dict[str, bool]:
        return {attribute: getattr(self.reading, attribute) == getattr(self.scene, attribute) for attribute in ATTRIBUTES}


def render_all(models: dict, cfg_scales: tuple[float, ...], images_per_caption: int, seed: int, **settings) -> list[Render]:
    """Every caption "a {colour} {shape} on the {position}", each with the same `images_per_caption` noises."""
    renders = []
    for held_out in (False, True):
        for colour, shape, position in combinations(held_out):
            scene = Scene(colour, shape, position)
            for cfg in cfg_scales:
                images = generate(scene.caption(), models=models, cfg_scale=cfg, seed=seed, num_images=images_per_caption, progress=False, **settings)
                renders += [Render(scene, held_out, cfg, k, image) for k, image in enumerate(images)]
    return renders


def accuracy(renders: list[Render]) -> dict[str, float]:
    """The share of images whose colour, shape and position (and all three) are right, in per cent."""
    scores = [render.correct() for render in renders]
    result = {attribute: 100 * np.mean([score[attribute] for score in scores]) for attribute in ATTRIBUTES}
    result["all three"] = 100 * np.mean([all(score.values()) for score in scores])
    return result


def layout_from_noise(renders: list[Render]) -> float:
    """How much the starting noise, not the text, picks the place: for each noise, the share of captions whose
    object lands in that noise's most common position, averaged (25 % when the text alone decides)."""
    shares = []
    for noise in sorted({render.noise for render in renders}):
        positions = [render.reading.position for render in renders if render.noise == noise]
        shares.append(Counter(positions).most_common(1)[0][1] / len(positions))
    return 100 * float(np.mean(shares))


def report(renders: list[Render]) -> dict:
    figures = {}
    for cfg in sorted({render.cfg for render in renders}, reverse=True):
        for held_out, name in ((False, "trained"), (True, "held-out")):
            chosen = [render for render in renders if render.cfg == cfg and render.held_out == held_out]
            figures[f"cfg {cfg:g}, {name}"] = accuracy(chosen)
        figures[f"cfg {cfg:g}, layout from noise"] = layout_from_noise([render for render in renders if render.cfg == cfg])
    return figures


def print_table(figures: dict) -> None:
    print(f"{'':28}" + "".join(f"{name:>11}" for name in (*ATTRIBUTES, "all three")))
    for name, values in figures.items():
        if isinstance(values, dict):
            print(f"{name:28}" + "".join(f"{values[key]:10.1f}%" for key in (*ATTRIBUTES, "all three")))
        else:
            print(f"{name:28}{values:10.1f}% of images in their noise's most common position (25% = text alone decides)")


def grid(renders: list[Render], cfg: float, noise: int = 0) -> Image.Image:
    """One row per colour and shape, one column per position: the images of one starting noise, labelled."""
    cell = 64 * GRID_SCALE
    rows = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    sheet = Image.new("RGB", (LABEL_WIDTH + cell * len(POSITIONS), 24 + cell * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for column, position in enumerate(POSITIONS):
        draw.text((LABEL_WIDTH + column * cell + 8, 6), position, fill="black")
    chosen = {(r.scene.colour, r.scene.shape, r.scene.position): r for r in renders if r.cfg == cfg and r.noise == noise}
    for row, (colour, shape) in enumerate(rows):
        top = 24 + row * cell
        held_out = chosen[(colour, shape, POSITIONS[0])].held_out
        draw.text((8, top + cell // 2 - 12), f"{colour} {shape}", fill="black")
        if held_out:
            draw.text((8, top + cell // 2 + 2), "(never in training)", fill="red")
        for column, position in enumerate(POSITIONS):
            image = chosen[(colour, shape, position)].image.resize((cell, cell), Image.NEAREST)
            sheet.paste(image, (LABEL_WIDTH + column * cell, top))
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT)
    parser.add_argument("--images", type=int, default=4, help="images per caption and CFG scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=Path, default=Path("images/demo-grid.png"))
    parser.add_argument("--json", type=Path, default=Path("outputs/eval-demo.json"))
    args = parser.parse_args()
    models = load_models(args.checkpoint)
    renders = render_all(models, (7.5, 1.0), args.images, args.seed, **COMMAND_DEFAULTS)
    figures = report(renders)
    print_table(figures)
    for path in (args.grid, args.json):
        path.parent.mkdir(parents=True, exist_ok=True)
    grid(renders, 7.5).save(args.grid)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.grid} and {args.json}")


if __name__ == "__main__":
    main()
