"""Plan steps on stand-in stages (no Ray): what a plan answers when one of its stages fails."""

from __future__ import annotations

import pytest
from PIL import Image

from deployments.support.cropping import Crop
from deployments.support.errors import GpuOutOfMemory, ServiceError
from deployments.support.generation import Encoding, StageResult
from graphs import plans
from tests.helpers import pixels

pytestmark = pytest.mark.anyio


class Response:
    """A stage call: awaiting it awaits its input (a chained response), then runs the stage."""

    def __init__(self, run, source=None) -> None:
        self.run, self.source = run, source

    def __await__(self):
        return self._result().__await__()

    async def _result(self):
        source = await self.source if isinstance(self.source, Response) else self.source
        return self.run(source)

    def cancel(self) -> None:
        pass


class Faces:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def __getattr__(self, _method):
        return self

    def remote(self, source, _weight, encode=None):
        def restore(result: StageResult) -> StageResult:
            if self.error:
                raise self.error
            out = result.then([Image.new("RGB", result.image.size, "white")], face_restoration_applied=True)
            return out.encode(encode) if encode else out
        return Response(restore, source)


class Checker(Faces):
    """Fails its first call only (a signing service that hiccups), if given an error."""

    def remote(self, source, encode=None):
        def check(result: StageResult) -> StageResult:
            if self.error:
                error, self.error = self.error, None
                raise error
            return result.then(result.images, nsfw=[False]).encode(encode)
        return Response(check, source)


class Stages:
    last = plans.Handles.last
    screen = plans.Handles.screen

    def __init__(self, faces_error=None, checker_error=None, checker=True) -> None:
        self.faces = Faces(faces_error)
        self.safety = Checker(checker_error) if checker else None


def base_image() -> Response:
    return Response(lambda _: StageResult(images=[Image.new("RGB", (64, 64), "black")], seeds=[7]))


@pytest.mark.parametrize("checker", [True, False])
async def test_failed_faces_give_the_screened_unprocessed_image_marked_degraded(checker):
    opts = plans.PlanOptions(restore_faces=True)
    report = await plans._finish(Stages(GpuOutOfMemory("full"), checker=checker), base_image(), 7, opts, [])
    assert report.degraded and not report.face_restoration_applied
    assert report.warnings == ["face restoration failed (GPU_OOM): unprocessed image"]
    assert (report.nsfw is not None) == checker  # screened all the same
    assert plans.Report.from_facts(report.data, report.facts()).degraded


async def test_a_checker_failing_after_restored_faces_is_its_own_failure():
    """Not 'face restoration failed': the faces were restored; the request fails as the checker did."""
    opts = plans.PlanOptions(restore_faces=True)
    with pytest.raises(ServiceError, match="signing"):
        await plans._finish(Stages(checker_error=ServiceError("signing failed")), base_image(), 7, opts, [])


async def test_a_whole_answer_is_not_degraded():
    opts = plans.PlanOptions(restore_faces=True)
    report = await plans._finish(Stages(), base_image(), 7, opts, [])
    assert report.face_restoration_applied and not report.degraded and report.nsfw is False


async def test_a_degraded_answer_is_not_cached(tmp_path):
    from graphs.jobs.cache import RequestCache

    class Store:
        def __init__(self) -> None:
            self.kept: list[str] = []

        def put(self, key, facts, files) -> None:
            self.kept.append(key)

    store = Store()
    cache = RequestCache(None, None, plans.Settings())  # type: ignore[arg-type]
    cache.cache = store  # type: ignore[assignment]
    data = StageResult(images=[Image.new("RGB", (8, 8))], seeds=[1]).encode(Encoding()).encoded[0]
    whole = plans.Report(data=data, size=(8, 8), seed=1)
    degraded = plans.Report(data=data, size=(8, 8), seed=1, degraded=True)
    await cache.put("whole", whole.facts(), [data])
    await cache.put("degraded", degraded.facts(), [data])
    assert store.kept == ["whole"]


def test_a_style_transfer_takes_its_content_aspect_at_a_size_the_base_accepts():
    """A 12 MP phone photo, a wide panorama and a thumbnail each become a valid request at their aspect (the
    content image's own size was refused by the base, or by the request model, after the job's 202)."""
    from tests.helpers import b64

    style = b64(Image.new("RGB", (64, 64), "red"))
    for size, expected in [((3000, 4000), (888, 1184)), ((6000, 2000), (1776, 592)), ((60, 60), (64, 64)),
                           ((512, 384), (512, 384))]:
        request = plans.seed003("style-transfer", {"contentImage": b64(Image.new("RGB", size)), "styleImage": style})
        assert (request.width, request.height) == expected
        assert request.width * request.height <= plans.STYLE_AREA * 1.01


def test_a_seed_003_inpaint_runs_at_its_inpainting_strength():
    from tests.helpers import b64

    image = b64(Image.new("RGB", (64, 64)))
    request = plans.seed003("inpaint", {"image": image, "mask": image, "inpaintingStrength": 0.4})
    assert request.strength == pytest.approx(0.4)


def test_a_style_transfer_keeps_more_of_its_content_the_higher_its_content_strength():
    """contentStrength is how much of the content image stays: the img2img strength (how much is repainted) is
    its complement."""
    from tests.helpers import b64

    image = b64(Image.new("RGB", (64, 64)))
    request = plans.seed003("style-transfer", {"contentImage": image, "styleImage": image, "contentStrength": 0.8})
    assert request.strength == pytest.approx(0.2)


class Recorder:
    """A base or refiner stand-in that keeps the requests it is given and answers with a black image."""

    def __init__(self) -> None:
        self.requests: list = []

    def __getattr__(self, _method):
        return self

    def remote(self, request, source=None, *_args, **_kwargs):
        self.requests.append(request)
        upstream = source if isinstance(source, Response) else None
        return Response(lambda _: StageResult(images=[Image.new("RGB", (64, 64))], seeds=[7]), upstream)


@pytest.mark.parametrize("plan", ["standard", "a1111"])
async def test_the_refiner_ensemble_is_asked_for_the_base_sampler_and_schedule(plan):
    """The refiner reads the base's latents in the base's sampler's space: the plan hands it the request's sampler
    and schedule (it handed neither, and the refiner ran Euler after a DPM++ 2M Karras base)."""
    from deployments.support.generation import GenerationRequest

    stages = Stages()
    stages.base, stages.refiner = Recorder(), Recorder()
    request = GenerationRequest(prompt="p", seed=7, sampler="DPM++ 2M", schedule="Karras")
    if plan == "standard":
        await plans.standard(stages, request, plans.PlanOptions())
    else:
        await plans.a1111_batch(stages, request, "r", refiner_switch_at=0.7, encode=Encoding())
    assert stages.base.requests[0].sampler == "DPM++ 2M" and stages.base.requests[0].denoising_end is not None
    ensemble = stages.refiner.requests[0]
    assert (ensemble.sampler, ensemble.schedule, ensemble.denoising_start) == (
        "DPM++ 2M", "Karras", 0.8 if plan == "standard" else 0.7)


async def test_the_pixel_hires_second_pass_runs_exactly_its_steps():
    """As on the latent path, A1111's hr_second_pass_steps run whatever the denoising strength: the second base
    pass asks for exact steps (it ran int(steps x strength), 14 of 20 at 0.7)."""
    from deployments.support.generation import GenerationRequest

    stages = Stages()
    stages.base, stages.upscaler = Recorder(), Recorder()
    hires = plans.A1111Hires(upscaler="R-ESRGAN 4x+", width=128, height=128, strength=0.7, steps=20)
    await plans.a1111_batch(stages, GenerationRequest(prompt="p", seed=7, steps=30), "r", hires=hires,
                            encode=Encoding())
    first, again = stages.base.requests
    assert not first.exact_steps and (again.steps, again.strength, again.exact_steps) == (20, 0.7, True)


async def test_the_pixel_hires_fix_puts_every_recolor_map_back_into_its_second_passs_images_alone():
    """The extension puts the recolor maps back into A1111's finished images: the first pass's images get none; the
    second pass's get every recolor unit's (a unit guiding the first pass alone too), its ControlNet units being
    those its hr_option names."""
    from deployments.support.control import ControlUnit
    from deployments.support.generation import GenerationRequest

    image = Image.new("RGB", (64, 64), "grey")
    low, high, canny = (ControlUnit(model="c", image=image, module=module, passes=passes) for module, passes in
                        (("recolor_luminance", "first"), ("recolor_intensity", "second"), ("canny", "both")))
    stages = Stages()
    stages.base, stages.upscaler = Recorder(), Recorder()
    hires = plans.A1111Hires(upscaler="Lanczos", width=128, height=128, strength=0.5, steps=2)
    await plans.a1111_batch(stages, GenerationRequest(prompt="p", seed=7, control=[low, high, canny]), "r",
                            hires=hires, encode=Encoding())
    first, again = stages.base.requests
    assert first.recolor == [] and [u.module for u in first.control] == ["recolor_luminance", "canny"]
    assert again.recolor == [low, high] and [u.module for u in again.control] == ["recolor_intensity", "canny"]


class Cropper:
    """A focal cropper stand-in: every size cut from the same box of the base, upscaled when the box is smaller."""

    BOX = (8, 8, 56, 56)

    def __getattr__(self, _method):
        return self

    def remote(self, base, sizes):
        def crop(result: StageResult):
            region = result.image.crop(self.BOX)
            return None, [Crop(s.name, self.BOX, region.resize((s.width, s.height)), s.width > region.width)
                          for s in sizes]
        return Response(crop, base)


class Upscaler:
    """Keeps what it is asked (and the size of the base it is handed) and answers with a white image."""

    def __init__(self) -> None:
        self.calls: list = []

    def __getattr__(self, _method):
        return self

    def remote(self, source, upscaler, scale, width, height, box=None):
        def upscale(result: StageResult) -> StageResult:
            self.calls.append((result.image.size, upscaler, scale, width, height, box))
            return result.then([Image.new("RGB", (width, height), "white")])
        return Response(upscale, source)


async def test_a_crop_smaller_than_its_size_is_the_neural_upscale_of_its_base_region():
    """The upscaler gets the whole base and the crop's box (it upscales that region from the base's pixels, not
    the cropper's Lanczos enlargement); a crop large enough is the cropper's own."""
    from graphs.jobs.sizes import SizeTable

    table = SizeTable(landscape_above=1.2, portrait_below=0.83, bases={"square": (64, 64)},
                      sizes={"avatar": (32, 32), "large": (128, 128)})
    stages = Stages(checker=False)
    stages.base, stages.upscaler = Recorder(), Upscaler()
    seed, bases, sized = await plans.batch_sizes(stages, Cropper(), {"prompt": "p", "sizes": ["avatar", "large"],
                                                                     "seed": 7}, table, "R-ESRGAN 4x+", "r")
    assert (seed, bases) == (7, 1)
    assert stages.upscaler.calls == [((64, 64), "R-ESRGAN 4x+", None, 128, 128, Cropper.BOX)]
    avatar, large = sized
    assert (avatar.name, avatar.upscaled, pixels(avatar.image).max()) == ("avatar", False, 0)  # the cropper's
    assert (large.name, large.upscaled, pixels(large.image).min()) == ("large", True, 255)  # the upscaler's
