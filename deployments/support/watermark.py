"""The invisible watermark on generated images: invisible-watermark's DWT-DCT method, SDXL's reference watermark.

The package's own ``encode`` wrapper swaps the horizontal and vertical wavelet details when it rebuilds the image and
wraps 8-bit values around, which costs 5 to 15 dB of PSNR, and it loops over blocks in Python; so its embedding rule
runs here vectorised (``quantise_band``: the package's result to the bit, tested) on the Haar band this module
computes, and where the rule would push pixels past 0 or 255 it takes the step above or below. The package's decoder
(``WatermarkDecoder``) reads the result. By default the mark is in the luma band, where it survives JPEG and WebP
re-encoding; SDXL's reference puts it in the U band, which lossy re-encoding erases (``WATERMARK_CHROMA_SCALE`` adds
that band).

Embedding needs numpy alone; invisible-watermark (and with it OpenCV and torch) is imported only to read a mark.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from deployments.support.settings import Settings

MIN_SIDE = 256  # the package refuses images under 256x256 pixels; here a side under 256 is not marked
KEEP_LARGEST = 2.0  # margin by which a moved coefficient stays the block's largest, for rounding on the way back
FOUND_AT = 0.9  # fraction of payload bits that must match: unmarked images read about half of them


def _rgb(image: Image.Image) -> Image.Image:
    """The colour planes the mark lives in (an alpha channel is kept aside, not blended in)."""
    return image if image.mode == "RGB" else image.convert("RGB")


class WatermarkReport(BaseModel):
    checked: bool = Field(..., description="false: a side under 256 pixels, too small for the method")
    found: bool = Field(False, description=f"at least {FOUND_AT:.0%} of the configured payload's bits read back")
    payload: str | None = Field(None, description="the bits read, as 0s and 1s")
    payload_hex: str | None = None
    bit_accuracy: float | None = Field(None, description="fraction of bits equal to the configured payload")
    reason: str | None = None


@dataclass(frozen=True)
class Watermark:
    """The payload and the quantisation steps of the two bands the method can use (luma Y, chroma U)."""

    bits: tuple[int, ...]
    luma_scale: float
    chroma_scale: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Watermark:
        return cls(tuple(int(b) for b in settings.watermark_bits), settings.watermark_luma_scale,
                   settings.watermark_chroma_scale)

    @property
    def scales(self) -> list[float]:
        return [self.luma_scale, self.chroma_scale, 0.0]  # Y, U; the method never reads V

    @staticmethod
    def fits(image: Image.Image) -> bool:
        return min(image.size) >= MIN_SIDE

    def embed(self, image: Image.Image) -> Image.Image:
        """The image with the payload in its pixels (alpha, if any, untouched)."""
        rgb = np.asarray(_rgb(image))
        rows, cols = rgb.shape[0] // 4 * 4, rgb.shape[1] // 4 * 4
        red, green, blue = (rgb[:rows, :cols, c].astype(np.float32) for c in range(3))
        luma = 0.299 * red + 0.587 * green + 0.114 * blue  # OpenCV's YUV, as the decoder converts
        planes = (luma, 0.492 * (blue - luma) + 128.0)
        out = rgb.copy()
        for channel, scale in enumerate(self.scales[:2]):
            if scale <= 0:
                continue
            p, q, change = quantise_band(haar_band(planes[channel]), self.bits, scale,
                                         rgb[:rows, :cols] if channel == 0 else None)
            # The inverse wavelet transform with only this band changed: each of the four pixels a moved
            # coefficient covers moves by half its change, in R, G and B as this plane moves them.
            for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
                r, c = 2 * p + dy, 2 * q + dx
                moved = out[r, c].astype(np.float32) + (change / 2)[:, None] * _RGB_PER_UNIT[channel]
                out[r, c] = np.clip(np.rint(moved), 0, 255).astype(np.uint8)
        marked = Image.fromarray(out)
        if image.mode == "RGBA":
            marked.putalpha(image.getchannel("A"))
        return marked

    def read(self, image: Image.Image) -> WatermarkReport:
        if not self.fits(image):
            return WatermarkReport(checked=False, reason=f"{image.width}x{image.height} is smaller than "
                                   f"{MIN_SIDE}x{MIN_SIDE}: the method cannot carry a mark")
        from imwatermark import WatermarkDecoder

        bgr = np.ascontiguousarray(np.asarray(_rgb(image))[:, :, ::-1])
        bits = np.asarray(WatermarkDecoder("bits", len(self.bits)).decode(bgr, "dwtDct", scales=self.scales),
                          dtype=np.uint8)
        accuracy = float(np.mean(bits == np.asarray(self.bits, dtype=np.uint8)))
        padded = np.concatenate([bits, np.zeros(-len(bits) % 8, np.uint8)])
        return WatermarkReport(checked=True, found=accuracy >= FOUND_AT, payload="".join(map(str, bits)),
                               payload_hex=np.packbits(padded).tobytes().hex(), bit_accuracy=round(accuracy, 4))


# What a unit change of Y or U does to R, G and B (OpenCV's YUV): luma moves all three alike.
_RGB_PER_UNIT = np.array([[1.0, 1.0, 1.0], [0.0, -0.395, 2.032]], dtype=np.float32)


def haar_band(plane: np.ndarray) -> np.ndarray:
    """The approximation band of a one-level Haar transform (``pywt.dwt2(plane, "haar")[0]``, tested): each
    coefficient is half the sum of a 2x2 pixel group."""
    rows, cols = plane.shape[0] // 2 * 2, plane.shape[1] // 2 * 2
    return plane[:rows, :cols].reshape(rows // 2, 2, cols // 2, 2).sum(axis=(1, 3), dtype=np.float64) / 2


def quantise_band(band: np.ndarray, bits: tuple[int, ...], scale: float,
                  pixels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """invisible-watermark's DWT-DCT embedding (``EmbedMaxDct.encode_frame``), vectorised: in each 4x4 block of
    the band (row-major, bit ``i % len(bits)`` in block ``i``) the largest coefficient but the first moves to the
    lower (bit 0) or upper (bit 1) middle of its quantisation step. The package loops over the blocks in Python
    (see ``tests/bench_provenance.py``); this returns the moved coefficients (rows, columns, changes), which
    applied to the band give the package's result to the bit (tested).

    ``pixels``: the RGB image of a luma band. Where the package's target would push a pixel the coefficient covers
    past 0 or 255 (dark and bright areas, where clipping erases the bit), the same place in the step above or below
    is taken, one that keeps the coefficient the block's largest."""
    rows, cols = band.shape[0] // 4 * 4, band.shape[1] // 4 * 4
    blocks = band[:rows, :cols].reshape(rows // 4, 4, cols // 4, 4).swapaxes(1, 2).reshape(-1, 16)
    index = np.arange(len(blocks))
    position = np.argmax(np.abs(blocks[:, 1:]), axis=1) + 1  # ties: the first, as the package's argmax
    value = blocks[index, position].astype(np.float64)
    p = index // (cols // 4) * 4 + position // 4  # the coefficient's row and column in the band
    q = index % (cols // 4) * 4 + position % 4
    bit = np.asarray(bits, dtype=np.float64)[index % len(bits)]
    sign = np.where(value >= 0, 1.0, -1.0)
    target = sign * (np.floor(np.abs(value) / scale) + 0.25 + 0.5 * bit) * scale
    if pixels is not None:
        # The 2x2 pixel group under each moved coefficient; a change d moves its pixels by d/2.
        group = pixels[2 * p[:, None] + [0, 0, 1, 1], 2 * q[:, None] + [0, 1, 0, 1]]
        low, high = -2.0 * group.min(axis=(1, 2)), 2.0 * (255.0 - group.max(axis=(1, 2)))
        runner_up = np.partition(np.abs(blocks[:, 1:]), -2, axis=1)[:, -2]  # to be read back, stay above it
        options = np.stack([target, target + scale, target - scale])  # the package's first; same residue
        change = options - value
        in_range = (change >= low) & (change <= high) & (np.sign(options) * sign >= 0)
        fits = in_range & (np.abs(options) > runner_up + KEEP_LARGEST)
        cost = np.where(fits, np.abs(change), np.inf)
        cost[0] = np.where(in_range[0], -1.0, cost[0])  # the package's choice wherever it stays in range
        pick = np.argmin(cost, axis=0)
        target = np.where(np.isfinite(cost).any(axis=0), options[pick, index], target)
    return p, q, target - value
