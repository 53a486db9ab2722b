"""Contact sheets of a batch, and X/Y plots: the images of every combination of two settings, with the values
written along the edges."""

import math

from PIL import Image, ImageDraw, ImageFont

LABEL_PADDING = 4  # pixels around a label
BACKGROUND = "white"


def grid_rows(count: int) -> int:
    """As many rows as make the sheet nearest to square: round(sqrt(n)), as A1111 chooses them by default."""
    return max(1, round(math.sqrt(count)))


def contact_sheet(images: list[Image.Image]) -> Image.Image:
    """The images in rows of equal cells (the first image's size), left to right, top to bottom."""
    rows = grid_rows(len(images))
    columns = math.ceil(len(images) / rows)
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height), BACKGROUND)
    for index, image in enumerate(images):
        sheet.paste(image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    return sheet


def labelled_grid(cells: list[list[Image.Image]], column_labels: list[str], row_labels: list[str]) -> Image.Image:
    """`cells[row][column]` in a grid, each column's label above it and each row's on its left; every cell is as
    large as the largest image (a plot of sizes has several), each image at its top left."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    width = max(image.width for row in cells for image in row)
    height = max(image.height for row in cells for image in row)
    left_margin = max(text_size(label)[0] for label in row_labels) + 2 * LABEL_PADDING
    top_margin = max(text_size(label)[1] for label in column_labels) + 2 * LABEL_PADDING
    grid = Image.new("RGB", (left_margin + len(column_labels) * width, top_margin + len(row_labels) * height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(column_labels):
        label_width = text_size(label)[0]
        draw.text((left_margin + column * width + (width - label_width) // 2, LABEL_PADDING), label, fill="black", font=font)
    for row, label in enumerate(row_labels):
        label_height = text_size(label)[1]
        draw.text((LABEL_PADDING, top_margin + row * height + (height - label_height) // 2), label, fill="black", font=font)
        for column, image in enumerate(cells[row]):
            grid.paste(image.convert("RGB"), (left_margin + column * width, top_margin + row * height))
    return grid

