"""The recolor units' post-processing: A1111's ControlNet extension puts a recolor_luminance or recolor_intensity
unit's map back into every finished image (its Lab lightness or its HSV value becomes the map), after the decode and
before faces and the paste, whatever the unit's weight or guidance range, with the hires fix's map. Checked on the
tiny base against the extension's steps written out here (A1111's float samples included), and through a stop, the
refiner and a pixel hires fix's two passes."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

from deployments.support import control
from deployments.support.control import ControlUnit
from deployments.support.generation import BatchItem, GenerationRequest, LatentHires, RefineRequest
from tests.test_model_free import gamma

SMALL = dict(prompt="a lighthouse", width=64, height=64, steps=2, guidance_scale=5.0, seed=5)
IDLE = dict(guidance_start=0.5, guidance_end=0.5)  # a unit that guides no step (A1111 accepts the empty range)
# OpenCV's 8-bit Lab round trip: over every (L, a, b) whose RGB comes back with no channel at 0 or 255, the
# lightness read again is at most 2 levels off (6 of 2.08 M such triples; 4 % are 1 off). A clipped channel (the
# tiny base's colours are vivid) moves it further: there the image is the extension's, not the map.
ROUND_TRIP = 2


def unit(image: Image.Image, module: str, **options) -> ControlUnit:
    return ControlUnit(model="tiny-canny", image=image, module=module, **options)


def extension_put_back(decoded: Image.Image, level: np.ndarray, luminance: bool) -> np.ndarray:
    """The extension's post-processor, step by step, on A1111's decoded sample: the image as its float tensor in
    0..1 (channels first), times 255 truncated to 8 bits; OpenCV's RGB to Lab (HSV); the lightness (value) channel
    replaced by the map; back to RGB, over 255 in float32, clipped; then written out as A1111 writes a sample (255
    times it, truncated)."""
    x = torch.from_numpy(np.asarray(decoded).astype(np.float32) / 255.0).permute(2, 0, 1)
    h = (x.numpy().transpose(1, 2, 0) * 255).clip(0, 255).astype(np.uint8)
    there, back, channel = ((cv2.COLOR_RGB2LAB, cv2.COLOR_LAB2RGB, 0) if luminance
                            else (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB, 2))
    h = cv2.cvtColor(h, there)
    h[:, :, channel] = level
    h = cv2.cvtColor(h, back)
    y = torch.from_numpy((h.astype(np.float32) / 255.0).transpose(2, 0, 1)).clip(0, 1)
    return (255.0 * np.moveaxis(y.numpy(), 0, 2)).astype(np.uint8)


def lightness(image: Image.Image) -> np.ndarray:
    """recolor_luminance's map at gamma 1 (``test_model_free`` checks it against CIE's formula): OpenCV's 8-bit
    lightness of the RGB array read as BGR, as the extension reads it."""
    return cv2.cvtColor(np.asarray(image), cv2.COLOR_BGR2LAB)[:, :, 0]


def value(image: Image.Image) -> np.ndarray:
    return np.asarray(image).max(axis=2)


def test_a_recolor_unit_puts_its_map_back_into_each_image_of_the_batch(base, astronaut):
    """A luminance unit that guides no step: each image of the batch is the plain one's, its Lab lightness swapped
    for the map (the BGR-read lightness, gamma 0.7), exactly as the extension's post-processor makes it; wherever no
    channel clipped, the lightness read again is the map's within OpenCV's round trip."""
    small = astronaut.resize((64, 64))
    plain = base.generate(GenerationRequest(**SMALL, batch_size=2)).images
    made = base.generate(GenerationRequest(**SMALL, batch_size=2, control=[
        unit(small, "recolor_luminance", threshold_a=0.7, **IDLE)])).images
    level = gamma(lightness(small).astype(np.float64), 0.7)
    for before, after in zip(plain, made, strict=True):
        assert np.array_equal(np.asarray(after), extension_put_back(before, level, luminance=True))
        rgb = np.asarray(after)
        unclipped = ((rgb > 0) & (rgb < 255)).all(axis=2)
        off = np.abs(cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[:, :, 0].astype(int) - level)
        assert unclipped.mean() > 0.5 and off[unclipped].max() <= ROUND_TRIP
    assert not np.array_equal(np.asarray(made[0]), np.asarray(made[1]))  # each its own image, recoloured


def test_without_a_recolor_unit_nothing_is_put_back(base, astronaut):
    small = astronaut.resize((64, 64))
    plain = base.generate(GenerationRequest(**SMALL)).image
    other = base.generate(GenerationRequest(**SMALL, control=[unit(small, "threshold", **IDLE)])).image
    assert np.array_equal(np.asarray(other), np.asarray(plain))
    assert control.recolors([unit(small, "threshold"), unit(small, "canny")], None, 64, 64) == []


def test_the_value_is_the_maps_whatever_the_weight_and_guidance(base, astronaut):
    """An intensity unit's map is each image's HSV value exactly, at weight 0 as at 2 over a part of the steps."""
    small = astronaut.resize((64, 64))
    level = np.asarray(small).max(axis=2)
    for options in ({"conditioning_scale": 0.0}, {"conditioning_scale": 2.0, "guidance_end": 0.5}):
        made = base.generate(GenerationRequest(**SMALL, batch_size=2,
                                               control=[unit(small, "recolor_intensity", **options)]))
        assert all(np.array_equal(value(image), level) for image in made.images)


def test_a_hires_fix_takes_its_hires_map_and_the_last_unit_stands(base, astronaut):
    """A latent hires fix (64 to 128): the maps at 128, put back in the units' order (the lightness, then the
    value: the value is the second map's exactly), the one guiding the first pass alone included."""
    hires = dict(SMALL, steps=4, hires=LatentHires(width=128, height=128, strength=0.5, steps=2))
    large = astronaut.resize((128, 128))
    plain = base.generate(GenerationRequest(**hires)).image
    made = base.generate(GenerationRequest(**hires, control=[
        unit(large, "recolor_luminance", **IDLE), unit(large, "recolor_intensity", passes="first", **IDLE)])).image
    light = extension_put_back(plain, lightness(large), luminance=True)
    both = extension_put_back(Image.fromarray(light), np.asarray(large).max(axis=2), luminance=False)
    assert made.size == (128, 128) and np.array_equal(np.asarray(made), both)
    assert np.array_equal(value(made), np.asarray(large).max(axis=2))


def test_a_stopped_image_is_put_back_into_where_it_has_the_maps_size(base, astronaut):
    """/interrupt or /skip: an image stopped in a hires fix's second pass takes the map; one stopped in its first
    pass, at the first pass's size, is left as it is, as the extension's size check leaves it."""
    hires = dict(SMALL, steps=4, hires=LatentHires(width=128, height=128, strength=0.5, steps=2))
    large = astronaut.resize((128, 128))
    asked = GenerationRequest(**hires, control=[unit(large, "recolor_intensity", **IDLE)])

    def stopped_at(step: int, request: GenerationRequest) -> Image.Image:
        def stop(at: int, _total: int) -> None:
            if at == step:
                base.cancellation.stop(f"stop-{step}")
        (result,) = base.generate_batch([BatchItem(request, f"stop-{step}", on_progress=stop)])
        assert result.info["stopped_at"] == [step, 6]
        return result.image

    first = stopped_at(2, asked)
    assert first.size == (64, 64)
    assert np.array_equal(np.asarray(first), np.asarray(stopped_at(2, asked.model_copy(update={"control": []}))))
    assert np.array_equal(value(stopped_at(5, asked)), np.asarray(large).max(axis=2))


def test_the_refiner_puts_back_the_maps_the_base_hands_it(base, refiner, astronaut):
    """The base stops early for the refiner with latents, not images: its maps go with them, and the refiner puts
    them back into the images it decodes (A1111 switches models inside sampling, before the post-processing)."""
    small = astronaut.resize((64, 64))
    handoff = base.generate(GenerationRequest(**dict(SMALL, steps=4), denoising_end=0.5,
                                              control=[unit(small, "recolor_intensity")]))
    assert handoff.latents is not None and not handoff.images and len(handoff.recolors) == 1
    refined = refiner.refine_latents(RefineRequest(prompt="a lighthouse", steps=4, denoising_start=0.5), handoff)
    assert np.array_equal(value(refined.image), np.asarray(small).max(axis=2)) and not refined.recolors
