"""A1111's grid image: with ``save_images`` and two images or more, A1111 puts one picture of them all, side by side,
first in ``images`` (``index_of_first_image`` 1), as its ``return_grid`` option (default on) asks.

The images arrive here as the files their last stage encoded (only bytes come back to the ingress), so the grid is
made from those files, on a worker thread, and encoded as every answer file is (the saved format, its infotext, the
invisible watermark and the content credentials). Only a request that asks for it pays for it.
"""

from __future__ import annotations

import io
import math

from PIL import Image

from deployments.support.errors import InvalidInput
from deployments.support.generation import Encoding, StageResult

# The largest grid made, in pixels: sixteen 1024² images (four 2048² ones). A grid of more is left out with a
# warning: sixteen 2048² images make a 56 MB PNG that takes the ingress 9 s of a core and 2.9 GB at its peak.
MAX_GRID_PIXELS = 16 * 1024 * 1024
BACKGROUND = (255, 255, 255)  # A1111 1.10's grid_background_color default, #ffffff


def layout(count: int) -> tuple[int, int]:
    """Rows and columns of ``count`` images as A1111 1.10's ``image_grid`` lays them out at its defaults
    (``n_rows`` -1, ``grid_prevent_empty_spots`` off): about as many rows as columns, filled row by row."""
    rows = min(count, max(1, round(math.sqrt(count))))
    return rows, math.ceil(count / rows)


def compose(images: list[Image.Image]) -> Image.Image:
    """The grid of ``images``: cells as large as the largest image, each image centred in its own."""
    rows, cols = layout(len(images))
    width, height = (max(sides) for sides in zip(*(image.size for image in images), strict=True))
    grid = Image.new("RGB", (cols * width, rows * height), BACKGROUND)
    for i, image in enumerate(images):
        left, top = (width - image.width) // 2, (height - image.height) // 2
        grid.paste(image.convert("RGB"), ((i % cols) * width + left, (i // cols) * height + top))
    return grid


def grid_size(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The size of the grid of images of these sizes."""
    rows, cols = layout(len(sizes))
    return cols * max(w for w, _ in sizes), rows * max(h for _, h in sizes)


def grid_file(files: list[bytes], how: Encoding, info: dict) -> bytes:
    """The grid of the images in ``files``, encoded as ``how`` says (its first infotext the grid's, as A1111 writes
    the grid's from the first image's), marked as the images were; ``info``: what the stages ran (for the content
    credentials)."""
    images = []
    for data in files:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            images.append(image.convert("RGB"))
    if not images:
        raise InvalidInput("a grid needs images", field="save_images")
    texts = how.parameters[:1] if how.parameters else None
    made = StageResult(images=[compose(images)], info=info).encode(how.model_copy(update={"parameters": texts}))
    return made.encoded[0]
