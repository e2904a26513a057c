"""SDXL inpainting checkpoints (a 9-channel UNet) on the tiny models, as A1111 runs them: every mode on the factory's
tiny one (a diffusers folder and the same weights as one SGM file), checked against diffusers' inpainting pipeline
driven by hand, the UNet's extra channels as A1111 fills them, the unmasked pixels kept, batches, ControlNet, the
latent hires fix, a 4-channel checkpoint unchanged, and one A1111 request through the in-process graph."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from starlette.requests import Request

from deployments.support.control import ControlUnit
from deployments.support.fastpath import decode
from deployments.support.generation import BatchItem, GenerationRequest, LatentHires
from deployments.support.samplers import build_scheduler
from tests.helpers import b64, centre_square, decode_b64, pixels

# Euler: the pipelines draw nothing from the generators after the start, so a hand-driven call compares exactly.
SMALL = dict(prompt="a lighthouse", width=64, height=64, steps=2, guidance_scale=5.0, seed=5, sampler="Euler")
INPAINT, FILE, PLAIN = "tiny-inpaint", "tiny-inpaint-file", "tiny-plain"


@pytest.fixture(scope="module")
def inpaint(tiny):
    """A base replica's model holding the tiny inpainting checkpoint (folder and single file) and the tiny base."""
    from deployments.sdxl_base import BaseGenerator
    from deployments.support.config import SDXLBaseConfig

    return BaseGenerator(SDXLBaseConfig.model_validate({
        "checkpoints": [{"name": INPAINT, "source": str(tiny / "sdxl-inpaint")},
                        {"name": FILE, "source": str(tiny / "sdxl-inpaint.safetensors"),
                         "config": str(tiny / "sdxl-base")},
                        {"name": PLAIN, "source": str(tiny / "sdxl-base")}],
        "controlnets": {"tiny-canny": str(tiny / "controlnet-canny")}, "max_loaded_checkpoints": 3}))


@pytest.fixture(scope="module")
def photo(astronaut) -> Image.Image:
    return astronaut.resize((64, 64))


@pytest.fixture(scope="module")
def square() -> Image.Image:
    return centre_square()


def run(generator, **kw):
    return generator.generate(GenerationRequest(**{**SMALL, "checkpoint": INPAINT, **kw}))


def image(generator, **kw) -> np.ndarray:
    return pixels(run(generator, **kw).images[0])


def by_hand(generator, cls, checkpoint: str, seed: int = 5, **kw) -> np.ndarray:
    """The image a diffusers pipeline of ``cls`` made from ``checkpoint``'s modules gives, called by hand with the
    request's settings and seed, decoded as the base decodes (``fastpath.decode``: no watermark)."""
    held = generator.checkpoint(checkpoint)
    pipe = cls.from_pipe(held.txt2img)
    pipe.scheduler = build_scheduler(SMALL["sampler"], held.scheduler_config)
    latents = pipe(prompt=[SMALL["prompt"]], num_inference_steps=SMALL["steps"],
                   guidance_scale=SMALL["guidance_scale"], generator=[torch.Generator("cpu").manual_seed(seed)],
                   output_type="latent", **kw).images
    return pixels(decode(held.txt2img, latents)[0])


class Spy:
    """The UNet inputs of every call while it watches: (channels, the mask channel's min and max)."""

    def __init__(self, unet) -> None:
        self.unet, self.seen = unet, []

    def __enter__(self) -> Spy:
        def record(module, args, kwargs):
            sample = kwargs.get("sample", args[0] if args else None)
            self.seen.append((sample.shape[1], float(sample[:, 4].min()), float(sample[:, 4].max()), sample.shape))

        self.hook = self.unet.register_forward_pre_hook(record, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.hook.remove()


# --- loading ------------------------------------------------------------------------------------------------------

def test_the_single_file_loads_nine_channels_from_its_header_and_gives_the_folders_pixels(inpaint, tiny, caplog):
    from deployments.weights import loader

    assert loader.sgm_unet_channels(tiny / "sdxl-inpaint.safetensors") == 9
    assert loader.sgm_unet_channels(tiny / "sdxl-base.safetensors") == 4
    assert loader.sgm_unet_channels(tiny / "loras" / "tiny-style.safetensors") is None  # no UNet in it
    with caplog.at_level(logging.INFO, logger="deployments.weights.loader"):
        held = inpaint.load(FILE)
    assert held.txt2img.unet.config.in_channels == 9 and held.txt2img.vae.config.in_channels == 3
    assert "sdxl-inpaint.safetensors is an inpainting checkpoint" in caplog.text
    assert np.array_equal(image(inpaint, checkpoint=FILE), image(inpaint))


# --- every mode, as A1111 conditions it -------------------------------------------------------------------------

MODES = {
    "txt2img": {},
    "img2img": {"strength": 0.6},
    "inpaint": {"strength": 0.8},
    "latent hires": {"hires": LatentHires(width=96, height=128, strength=0.5, steps=2)},
    "batch": {"batch_size": 2},
    "variation": {"subseed": 11, "subseed_strength": 0.5},
    "controlnet": {"control": ["unit"]},
    "controlnet img2img": {"strength": 0.6, "control": ["unit"]},
}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_runs_at_its_size_and_repeats_per_seed(inpaint, photo, square, mode):
    kw = dict(MODES[mode])
    if "strength" in kw:
        kw["init_image"] = photo
    if mode == "inpaint":
        kw["mask"] = square
    if "control" in kw:
        kw["control"] = [ControlUnit(model="tiny-canny", image=photo if mode == "controlnet" else None)]
    first = run(inpaint, **kw)
    size = kw["hires"].size if "hires" in kw else (64, 64)
    assert [i.size for i in first.images] == [size] * kw.get("batch_size", 1) and not first.warnings
    assert [pixels(i).tolist() for i in run(inpaint, **kw).images] == [pixels(i).tolist() for i in first.images]
    assert not np.array_equal(pixels(run(inpaint, **{**kw, "seed": 6}).images[0]), pixels(first.images[0]))


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "latent hires"])
def test_the_unet_reads_a_mask_of_ones_beside_the_latents_where_nothing_is_masked(inpaint, photo, mode):
    """A1111's conditioning without an image mask: the mask channel all ones (the masked image is then all grey),
    at the size of the pass that runs (the hires fix's second pass at its own)."""
    kw = {"txt2img": {}, "img2img": {"init_image": photo, "strength": 0.6},
          "latent hires": {"hires": LatentHires(width=128, height=96, strength=0.5, steps=2)}}[mode]
    with Spy(inpaint.checkpoint(INPAINT).txt2img.unet) as spy:
        run(inpaint, **kw)
    # Guidance doubles the rows; the latents are the VAE's 4 channels, the mask and the masked image 5 more.
    assert {(channels, low, high) for channels, low, high, _ in spy.seen} == {(9, 1.0, 1.0)}
    if mode == "latent hires":
        assert {tuple(shape[2:]) for *_, shape in spy.seen} == {(8, 8), (12, 16)}


def test_text_to_image_is_the_inpainting_pipeline_on_a_grey_image_wholly_masked_from_noise(inpaint):
    from diffusers import StableDiffusionXLInpaintPipeline

    grey, white = Image.new("RGB", (64, 64), (128, 128, 128)), Image.new("L", (64, 64), 255)
    expected = by_hand(inpaint, StableDiffusionXLInpaintPipeline, INPAINT, image=grey, mask_image=white,
                       strength=1.0, width=64, height=64)
    assert np.array_equal(image(inpaint), expected)
    # The init image never reaches it: wholly masked, any image reads as grey (0 in [-1, 1]).
    assert np.array_equal(by_hand(inpaint, StableDiffusionXLInpaintPipeline, INPAINT, image=Image.new("RGB", (64, 64)),
                                  mask_image=white, strength=1.0, width=64, height=64), expected)


def test_image_to_image_is_the_inpainting_pipeline_wholly_masked_from_the_noised_image(inpaint, photo):
    from diffusers import StableDiffusionXLInpaintPipeline

    white = Image.new("L", (64, 64), 255)
    expected = by_hand(inpaint, StableDiffusionXLInpaintPipeline, INPAINT, image=photo, mask_image=white,
                       strength=0.6, width=64, height=64)
    assert np.array_equal(image(inpaint, init_image=photo, strength=0.6), expected)


def test_image_to_image_at_strength_one_still_starts_from_the_noised_image(inpaint, photo):
    """As A1111's img2img (and the image-to-image pipeline) do, where diffusers' inpainting pipeline would start from
    noise alone: two init images give two images."""
    dark = Image.new("RGB", (64, 64), (20, 30, 40))
    assert not np.array_equal(image(inpaint, init_image=photo, strength=1.0),
                              image(inpaint, init_image=dark, strength=1.0))


def test_inpainting_keeps_the_unmasked_pixels_and_repaints_the_masked(inpaint, photo, square):
    out = image(inpaint, init_image=photo, mask=square, mask_blur=0, strength=0.8)
    kept = np.asarray(square) == 0
    assert np.array_equal(out[kept], pixels(photo)[kept])
    assert np.abs(out[~kept] - pixels(photo)[~kept]).mean() > 10


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def test_a_batch_gives_each_request_its_pixels_alone(inpaint, photo):
    """Each image's masked image is encoded with its own generator, as alone: a batch changes its pixels no more
    than batched arithmetic does (the README's bound, under 1/255 on average)."""
    texts = [GenerationRequest(**{**SMALL, "checkpoint": INPAINT, **kw}) for kw in (
        {"seed": 1}, {"seed": 2, "prompt": "a red barn"}, {"seed": 3, "subseed": 9, "subseed_strength": 0.4})]
    edits = [GenerationRequest(**{**SMALL, "checkpoint": INPAINT, "init_image": init, "strength": 0.6, "seed": s})
             for init, s in ((photo, 1), (photo.rotate(90), 2))]
    for requests in (texts, edits):
        outcomes = inpaint.generate_batch([BatchItem(r, f"r{i}") for i, r in enumerate(requests)])
        alone = [pixels(inpaint.generate(r).images[0]) for r in requests]
        batched = [pixels(o.images[0]) for o in outcomes]
        for i, mine in enumerate(batched):
            assert mad(mine, alone[i]) < 1.0
            assert all(mad(mine, alone[i]) < mad(mine, other) for j, other in enumerate(alone) if j != i)


def test_a_controlnet_unit_guides_the_inpainting_checkpoint(inpaint, photo):
    unit = ControlUnit(model="tiny-canny", image=photo)
    assert not np.array_equal(image(inpaint, control=[unit]), image(inpaint))
    assert not np.array_equal(image(inpaint, init_image=photo, strength=0.6, control=[unit.model_copy(
        update={"image": None})]), image(inpaint, init_image=photo, strength=0.6))


def test_a_four_channel_checkpoint_still_runs_the_plain_pipelines(inpaint, photo):
    """The regression check: a base checkpoint's text-to-image and image-to-image are diffusers' own pipelines, as
    before inpainting checkpoints were served."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    assert np.array_equal(image(inpaint, checkpoint=PLAIN),
                          by_hand(inpaint, StableDiffusionXLPipeline, PLAIN, width=64, height=64))
    assert np.array_equal(image(inpaint, checkpoint=PLAIN, init_image=photo, strength=0.6),
                          by_hand(inpaint, StableDiffusionXLImg2ImgPipeline, PLAIN, image=photo, strength=0.6))


# --- through the graph ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ingress(tiny, tmp_path_factory):
    """The application on the tiny base and the tiny inpainting checkpoint, in-process (Serve's local testing mode)."""
    from ray import serve

    import graphs.app
    from graphs.app import build_app

    args = {"base": {"checkpoints": [{"name": PLAIN, "source": str(tiny / "sdxl-base")},
                                     {"name": INPAINT, "source": str(tiny / "sdxl-inpaint")}],
                     "max_loaded_checkpoints": 2}}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JOBS_DATA_DIR", str(tmp_path_factory.mktemp("inpaint-graph-jobs")))
        patch.setenv("MODEL_CACHE_DIR", str(tmp_path_factory.mktemp("inpaint-graph-hashes")))  # never the user's
        # Another in-process application of this pytest process gets a fresh copy of the FastAPI app (see
        # tests/test_safety_graph.py).
        original = graphs.app.Ingress.func_or_class.__bases__[0]
        patch.setattr(graphs.app, "Ingress", graphs.app.Ingress.options(
            func_or_class=serve.ingress(graphs.app.app)(original)))
        yield serve.run(build_app(args), name="inpaint-graph-test", _local_testing_mode=True)


def test_an_a1111_request_on_the_inpainting_checkpoint(ingress, photo):
    from graphs.api.a1111_models import Img2ImgRequest

    caller = Request({"type": "http", "method": "POST", "path": "/", "headers": [], "client": ("inpaint-test", 1)})
    body = Img2ImgRequest(prompt=SMALL["prompt"], width=64, height=64, steps=2, cfg_scale=5.0, seed=5,
                          sampler_name="Euler", denoising_strength=0.6, init_images=[b64(photo)],
                          override_settings={"sd_model_checkpoint": INPAINT, "inpainting_mask_weight": 0.5})
    answer = json.loads(ingress.img2img.remote(body, caller).result().body)
    info = json.loads(answer["info"])
    made = decode_b64(answer["images"][0])
    assert made.size == (64, 64) and info["sd_model_name"] == INPAINT
    assert info["is_using_inpainting_conditioning"] is True  # as A1111 reports an inpainting model's img2img
    # A1111 would lerp the masked image towards the init image by it: the conditioning here is its default's.
    assert "override_settings.inpainting_mask_weight is not applied here: the image was made without it" in \
        info["warnings"]
