"""The demo model's world: one coloured shape on a plain background, drawn on the fly with its caption, and
the rules that read colour, shape and position back off an image (for the evaluation and the tests).

Backgrounds are black, white or gray, drawn at random and named in half of the captions ("..., white
background"); prompts that do not name one leave it to the model.
"""

import functools
import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 50, 180),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}

# Colour-shape pairs never drawn in training, in any position: the model must combine words it saw apart.
HELD_OUT = (("purple", "triangle"), ("green", "circle"), ("orange", "square"))

# Where each position puts the object's centre, as fractions of the image's width and height.
CENTRES = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72)}
JITTER = 0.05  # of the side, each way
# Of the side: the circle's radius, the square's and the triangle's half width. Large enough that a square's
# corners reach into the next latent pixel: at (0.13, 0.17), with the square's half width 0.9 radii for the same
# area as the circle, the VAE's latents of the two differed by 0.06, against 0.15 for a circle and a triangle,
# and the model drew one round shape for both; here they differ by 0.13 (triangle 0.21).
RADIUS = (0.17, 0.21)

PHRASINGS = (
    "a {colour} {shape} on the {position}",
    "{colour} {shape}, {position}",
    "a {shape} that is {colour}, at the {position}",
    "a {colour} {shape} at the {position}",
    "{position}: a {colour} {shape}",
    "the {colour} {shape} is on the {position}",
)
BACKGROUND_PHRASINGS = (", {background} background", " on a {background} background")
SUPERSAMPLING = 4  # coverage of each pixel from 4x4 samples: antialiased edges


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str
    background: str = "black"

    def caption(self, phrasing: int = 0, background_phrasing: int | None = None) -> str:
        text = PHRASINGS[phrasing].format(colour=self.colour, shape=self.shape, position=self.position)
        text = text.replace("a orange", "an orange")
        if background_phrasing is not None:
            text += BACKGROUND_PHRASINGS[background_phrasing].format(background=self.background)
        return text


def combinations(held_out: bool) -> list[tuple[str, str, str]]:
    """Every (colour, shape, position) in training (held_out False: 60 of 72) or kept out of it (12)."""
    return [(c, s, p) for c, s, p in itertools.product(COLOURS, SHAPES, POSITIONS) if ((c, s) in HELD_OUT) == held_out]


def every_caption() -> list[str]:
    """Every caption training can draw, held-out words included (the text encoder keeps these tokens)."""
    scenes = [Scene(c, s, p, b) for c, s, p in combinations(False) + combinations(True) for b in BACKGROUNDS]
    return [""] + [scene.caption(i, j) for scene in scenes for i in range(len(PHRASINGS)) for j in (None, 0, 1)]


def random_batch(size: int, generator: torch.Generator, image_size: int = 64) -> tuple[torch.Tensor, list[str]]:
    """`size` training images (B, 3, S, S) in [-1, 1] and their captions, from the trained combinations."""
    trained = combinations(False)
    picks = torch.randint(len(trained), (size,), generator=generator).tolist()
    backgrounds = torch.randint(len(BACKGROUNDS), (size,), generator=generator).tolist()
    phrasings = torch.randint(len(PHRASINGS), (size,), generator=generator).tolist()
    named = torch.randint(2 * len(BACKGROUND_PHRASINGS), (size,), generator=generator).tolist()  # half unnamed
    scenes = [Scene(*trained[k], list(BACKGROUNDS)[b]) for k, b in zip(picks, backgrounds)]
    captions = [scene.caption(p, n if n < len(BACKGROUND_PHRASINGS) else None) for scene, p, n in zip(scenes, phrasings, named)]
    return draw(scenes, generator, image_size), captions


def draw(scenes: list[Scene], generator: torch.Generator, image_size: int = 64) -> torch.Tensor:
    """Images (B, 3, S, S) in [-1, 1] of the scenes, each object's size and place jittered by `generator`."""
    background = torch.tensor([BACKGROUNDS[scene.background] for scene in scenes], dtype=torch.float32)[:, :, None, None]
    return paint(background.expand(-1, -1, image_size, image_size), scenes, coverage(scenes, generator, image_size)) / 127.5 - 1


def random_vae_batch(size: int, generator: torch.Generator, image_size: int = 64, objects: int = len(POSITIONS)) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, S, S) in [-1, 1] for the VAE, each with one to `objects` shapes of the trained combinations
    in different places on one background, and the share of each pixel that the shapes cover (B, 1, S, S).

    The VAE has no captions to follow: several objects an image give it more edges and colours to learn from
    at the same cost.
    """
    pairs = [(colour, shape) for colour, shape, position in combinations(False) if position == POSITIONS[0]]
    backgrounds = [list(BACKGROUNDS)[k] for k in torch.randint(len(BACKGROUNDS), (size,), generator=generator).tolist()]
    places = torch.rand(size, len(POSITIONS), generator=generator).argsort(dim=1).tolist()  # each object its own place
    canvas = torch.tensor([BACKGROUNDS[name] for name in backgrounds], dtype=torch.float32)[:, :, None, None]
    canvas = canvas.expand(-1, -1, image_size, image_size)
    covered = torch.zeros(size, 1, image_size, image_size)
    for number in range(objects):
        picks = torch.randint(len(pairs), (size,), generator=generator).tolist()
        scenes = [Scene(*pairs[k], POSITIONS[place[number]], background) for k, place, background in zip(picks, places, backgrounds)]
        present = (torch.rand(size, generator=generator) < 0.5) | (number == 0)  # the first always, the others half the time
        shapes = coverage(scenes, generator, image_size) * present[:, None, None, None]
        canvas = paint(canvas, scenes, shapes)  # over what is there
        covered = torch.maximum(covered, shapes)
    return canvas / 127.5 - 1, covered


def coverage(scenes: list[Scene], generator: torch.Generator, image_size: int) -> torch.Tensor:
    """The share (B, 1, S, S) of each pixel that each scene's object covers, its size and place jittered."""
    batch = len(scenes)
    centres = torch.tensor([CENTRES[scene.position] for scene in scenes])  # (B, 2) as (x, y)
    centres = centres + (torch.rand(batch, 2, generator=generator) * 2 - 1) * JITTER
    radii = RADIUS[0] + torch.rand(batch, generator=generator) * (RADIUS[1] - RADIUS[0])  # (B,)
    samples = image_size * SUPERSAMPLING
    axis = (torch.arange(samples) + 0.5) / samples
    # (B, 1, 1) offsets of each sample point from the centre, in units of the radius: (B, samples, samples)
    x = (axis[None, None, :] - centres[:, 0, None, None]) / radii[:, None, None]
    y = (axis[None, :, None] - centres[:, 1, None, None]) / radii[:, None, None]
    inside = torch.stack([inside_shape(scene.shape, x[i], y[i]) for i, scene in enumerate(scenes)])
    # (B, 4S, 4S) -> (B, 1, S, S)
    return F.avg_pool2d(inside[:, None].float(), SUPERSAMPLING)


def paint(canvas: torch.Tensor, scenes: list[Scene], shapes: torch.Tensor) -> torch.Tensor:
    """The canvas (B, 3, S, S) in [0, 255] with each scene's colour laid over it where `shapes` covers it."""
    colour = torch.tensor([COLOURS[scene.colour] for scene in scenes], dtype=torch.float32)[:, :, None, None]
    return canvas + (colour - canvas) * shapes


def inside_shape(shape: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Whether each point (x, y), in radii from the centre, lies in the shape: all three are as wide as tall, the
    circle inscribed in the square."""
    if shape == "circle":
        return x**2 + y**2 <= 1
    if shape == "square":
        return (x.abs() <= 1) & (y.abs() <= 1)
    # an upright triangle, apex at the top, its box 2 radii wide and tall
    depth = (y + 1) / 2  # 0 at the apex, 1 at the base
    return (depth >= 0) & (depth <= 1) & (x.abs() <= depth)


@dataclass(frozen=True)
class Reading:
    """What the rules see in an image; None where there is no object to read."""

    colour: str | None
    shape: str | None
    position: str | None


CORNER = 0.2  # of the bounding box's height and width: the side of each corner that shape_measures looks at


def read_image(pixels: np.ndarray) -> Reading:
    """Colour, shape and position of the one object in an (H, W, 3) uint8 image (see find_object). Colour: the
    nearest of COLOURS to the object's core pixels; shape: the shape whose drawings' measures (shape_measures) are
    nearest to the object's; position: its centre's offset from the image's centre, along the axis where that
    offset is larger."""
    found = find_object(pixels)
    if found is None:
        return Reading(None, None, None)
    mask, core = found
    colour = min(COLOURS, key=lambda name: np.linalg.norm(core - np.array(COLOURS[name])))
    measures = shape_measures(mask)
    shape = min(SHAPES, key=lambda name: np.linalg.norm(measures - shape_prototypes()[name]))
    height, width = mask.shape
    rows, cols = np.nonzero(mask)
    dx, dy = cols.mean() + 0.5 - width / 2, rows.mean() + 0.5 - height / 2
    if abs(dx) >= abs(dy):
        position = "left" if dx < 0 else "right"
    else:
        position = "top" if dy < 0 else "bottom"
    return Reading(colour, shape, position)


def find_object(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The object's mask (H, W) and the mean colour of its core, or None where nothing stands out. The background
    is the median colour of the border; the object, the pixels more than half as far from it as the farthest ones
    (a robust maximum); its core, those more than three quarters as far."""
    image = pixels.astype(np.float32)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    distance = np.linalg.norm(image - np.median(border, axis=0), axis=-1)  # (H, W)
    far = np.percentile(distance, 99.5)
    if far < 60:
        return None
    return distance > far / 2, image[distance > 0.75 * far].mean(axis=0)


def shape_measures(mask: np.ndarray) -> np.ndarray:
    """How much of its bounding box's two top corners, its two bottom corners and the whole box an object's mask
    (H, W) covers. Drawn, a circle covers 0.15, 0.15, 0.79; a square 1, 1, 1; a triangle (apex up) 0, 0.83, 0.53.

    The corners tell a square with wavy sides from a circle (the share of the box alone, 0.8 or so for both, does
    not) and a triangle with rounded corners from either.
    """
    rows, cols = np.nonzero(mask)
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].astype(np.float32)
    corner_height, corner_width = (max(1, round(CORNER * side)) for side in box.shape)
    left, right = slice(None, corner_width), slice(-corner_width, None)
    top, bottom = box[:corner_height], box[-corner_height:]
    return np.array([(top[:, left].mean() + top[:, right].mean()) / 2, (bottom[:, left].mean() + bottom[:, right].mean()) / 2, box.mean()])


@functools.cache
def shape_prototypes() -> dict[str, np.ndarray]:
    """Each shape's mean shape_measures over drawings of it in every colour, position and background."""
    generator = torch.Generator().manual_seed(0)
    prototypes = {}
    for shape in SHAPES:
        scenes = [Scene(colour, shape, position, background) for colour in COLOURS for position in POSITIONS for background in BACKGROUNDS]
        pixels = ((draw(scenes, generator) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()  # (B, S, S, 3)
        prototypes[shape] = np.mean([shape_measures(find_object(image)[0]) for image in pixels], axis=0)
    return prototypes
