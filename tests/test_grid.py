"""`sd generate --grid` (a contact sheet of the batch) and `--xy` (an X/Y plot), on the demo model (64x64)."""

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import cli
from sd import Settings
from sd.grid import grid_rows

PROMPT = ["--prompt", "a red circle on the left", "--seed", 3, "--checkpoint", "demo"]


pytestmark = pytest.mark.usefixtures("command_environment")


def sd(*args):
    return CliRunner().invoke(cli.main, ["generate", *map(str, args)], prog_name="sd")


def pixels(image) -> np.ndarray:
    return np.asarray(image if isinstance(image, Image.Image) else Image.open(image))


@pytest.mark.parametrize("count, rows", [(1, 1), (2, 1), (3, 2), (4, 2), (5, 2), (6, 2), (7, 3), (9, 3), (10, 3), (13, 4)])
def test_rows_are_round_sqrt_as_in_a1111(count, rows):
    assert grid_rows(count) == rows


def test_grid_is_a_contact_sheet_of_the_batch_beside_it():
    result = sd(*PROMPT, "--steps", 2, "--num-images", 3, "--grid", "--outdir", "out")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "saved out/grid-0000.png"
    names = ["00000-3-a-red-circle-on-the-left.png", "00001-4-a-red-circle-on-the-left.png", "00002-5-a-red-circle-on-the-left.png"]
    grid = Image.open("out/grid-0000.png")
    assert grid.size == (2 * 64, 2 * 64)  # 3 images: 2 rows of 2
    for index, name in enumerate(names):
        x, y = 64 * (index % 2), 64 * (index // 2)
        assert np.array_equal(pixels(grid.crop((x, y, x + 64, y + 64))), pixels(Path("out") / name)), name
    assert (pixels(grid.crop((64, 64, 128, 128))) == 255).all()  # the empty spot
    assert grid.text["parameters"] == Image.open(Path("out") / names[0]).text["parameters"]

    # again: the images are replaced as asked, the grid is a new file
    assert sd(*PROMPT, "--steps", 2, "--num-images", 3, "--grid", "--outdir", "out", "--overwrite").exit_code == 0
    assert sorted(path.name for path in Path("out").glob("grid-*")) == ["grid-0000.png", "grid-0001.png"]


def test_xy_plot_renders_every_combination_with_one_model_load(monkeypatch):
    loads, real_load = [], cli.load
    monkeypatch.setattr(cli, "load", lambda *args: loads.append(args) or real_load(*args))
    result = sd(*PROMPT, "--xy", "cfg=3,7.5,12", "steps=2,3", "--outdir", "plot")
    assert result.exit_code == 0, result.output
    assert len(loads) == 1
    grid = Image.open("plot/grid-0000.png")
    left, top = grid.width - 3 * 64, grid.height - 2 * 64  # the margins hold the labels
    assert left > 30 and top > 8
    cells = sorted(Path("plot").glob("0000*.png"))
    assert len(cells) == 6
    for index, (steps, cfg) in enumerate([(s, c) for s in (2, 3) for c in (3, 7.5, 12)]):
        row, column = divmod(index, 3)
        box = (left + 64 * column, top + 64 * row, left + 64 * column + 64, top + 64 * row + 64)
        assert np.array_equal(pixels(grid.crop(box)), pixels(cells[index]))
        written = Settings.from_infotext(Image.open(cells[index]).text["parameters"])
        assert (written.cfg_scale, written.steps, written.seed) == (cfg, steps, 3)
        # each cell is the image a direct render with those settings gives
        assert sd(*PROMPT, "--cfg", cfg, "--steps", steps, "--output", f"direct-{index}.png").exit_code == 0
        assert np.array_equal(pixels(cells[index]), pixels(f"direct-{index}.png")), (cfg, steps)
        # a label above each column and beside each row: dark text on the white margin
        assert pixels(grid.crop((left + 64 * column, 0, left + 64 * column + 64, top))).min() < 128
    for row in range(2):
        assert pixels(grid.crop((0, top + 64 * row, left, top + 64 * row + 64))).min() < 128


def test_a_sampler_axis_takes_each_samplers_own_noise_levels():
    result = sd(*PROMPT, "--steps", 2, "--xy", "sampler=ddim,dpmpp_2m", "seed=1,2", "--output", "s.png")
    assert result.exit_code == 0, result.output
    samplers = [Settings.from_infotext(Image.open(f"s-{n}.png").text["parameters"]) for n in range(1, 5)]
    assert [(s.sampler, s.karras, s.seed) for s in samplers] == [("ddim", False, 1), ("dpmpp_2m", True, 1), ("ddim", False, 2), ("dpmpp_2m", True, 2)]
    assert Path("grid-0000.png").exists()


def test_a_plot_of_sizes_gives_each_cell_the_largest_size():
    result = sd(*PROMPT, "--steps", 2, "--xy", "width=64,128", "height=64,96", "--outdir", "sizes")
    assert result.exit_code == 0, result.output
    grid = Image.open("sizes/grid-0000.png")
    left, top = grid.width - 2 * 128, grid.height - 2 * 96
    assert left > 30 and top > 8
    for index, (height, width) in enumerate([(64, 64), (64, 128), (96, 64), (96, 128)]):
        row, column = divmod(index, 2)
        cell, = Path("sizes").glob(f"{index:05d}-*.png")
        assert Image.open(cell).size == (width, height)
        x, y = left + 128 * column, top + 96 * row
        assert np.array_equal(pixels(grid.crop((x, y, x + width, y + height))), pixels(cell)), (width, height)


@pytest.mark.parametrize(
    "axes, message",
    [
        (["colour=red,blue", "steps=2,3"], "error: --xy 'colour=red,blue': 'colour' is not a setting an X/Y plot can vary; choose one of prompt,"),
        (["cfg=", "steps=2,3"], "error: --xy 'cfg=': give cfg's values after '=', separated by commas"),
        (["cfg", "steps=2,3"], "error: --xy 'cfg': give cfg's values after '='"),
        (["cfg=3,,7", "steps=2,3"], "error: --xy 'cfg=3,,7': give cfg's values"),
        (["cfg=3,7", "steps=2,many"], "error: --xy 'steps=2,many': each value of steps must be a whole number"),
        (["cfg=3,7", "cfg=5"], "error: --xy: both axes vary cfg"),
        (["cfg=3,7", "steps=0,2"], "error: --xy: steps must be between 1 and 999, got 0"),
        (["sampler=euler,magic", "steps=2"], "error: --xy: unknown sampler 'magic': choose one of ddpm"),
    ],
)
def test_bad_xy_axes_are_refused_before_anything_is_written(tmp_path, axes, message):
    result = sd(*PROMPT, "--xy", *axes, "--outdir", "plot")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert not Path("plot").exists()
