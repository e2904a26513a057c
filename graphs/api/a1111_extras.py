"""Automatic1111's postprocessing routes: ``/extra-single-image`` and ``/extra-batch-images`` upscale (one
upscaler, or two blended) and restore faces, stage to stage; only a blend of two upscalers comes back through the
ingress. The answers are files in the saved ``samples_format`` (``graphs.api.a1111_options``)."""

from __future__ import annotations

import asyncio
import html
from typing import Any

from fastapi import APIRouter, Response
from PIL import Image

from deployments.support.generation import Encoding, StageResult
from deployments.support.imaging import decode
from graphs import flights, plans
from graphs.api.a1111_models import ExtrasBatchRequest, ExtrasBatchResponse, ExtrasRequest, ExtrasResponse
from graphs.api.a1111_options import answer_encoding
from graphs.api.a1111_sizes import upscale_to
from graphs.api.body import JSONBodyRoute, blobs, json_answer
from graphs.api.errors import call, documented
from graphs.api.fields import image_bytes
from graphs.jobs.store import JobStore

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"], route_class=JSONBodyRoute,
                   responses=documented(400, 503))


class A1111ExtrasRoutes:
    handles: plans.Handles
    jobs: JobStore
    provenance: object

    async def _check_upscalers(self, body: ExtrasRequest) -> None:
        """Refuse an unknown upscaler by the field that named it, before any image is decoded or upscaled."""
        named = {"upscaler_1": body.upscaler_1}
        if _blends(body):
            named["upscaler_2"] = body.upscaler_2
        await self.handles.check_upscalers(named)

    async def _extras(self, body: ExtrasRequest, image: Image.Image, raw: bytes, encoding: Encoding) -> StageResult:
        """The upscaled (and restored) ``image`` as a marked file (``encoded[0]``, encoded as ``encoding`` says) with
        its warnings, ``raw`` its upload. The last stage that runs encodes it, so the pixels travel stage to stage;
        only a blend of two upscalers comes through here."""
        how = encoding.model_copy(update={"parent": raw})
        scale: float | None = body.upscaling_resize
        width = height = box = None
        if body.resize_mode == 1:
            scale, width, height, box = upscale_to(image.size, body.upscaling_resize_w, body.upscaling_resize_h,
                                                   body.upscaling_crop)
        visibility = body.upscaler_2_visibility or body.extras_upscaler_2_visibility
        blend = _blends(body)
        face_visibility = max(body.codeformer_visibility, body.gfpgan_visibility)
        upscaler = self.handles.upscaler
        # In a flight: a deadline, a disconnect or a failed upscale cancels every call still running.
        async with flights.flight():
            last: Any = upscaler.upscale.remote(image, body.upscaler_1, scale, width, height,
                                                encode=None if blend or face_visibility > 0 else how, box=box)
            if blend:
                second = upscaler.upscale.remote(image, body.upscaler_2, scale, width, height, box=box)
                first, other = await call(last), await call(second)
                blended = await asyncio.to_thread(Image.blend, first.image, other.image, visibility)
                last = first.then([blended], warnings=other.warnings)
            if face_visibility > 0:
                last = self.handles.faces.restore.remote(last, body.codeformer_weight, face_visibility, encode=how)
            result = last if isinstance(last, StageResult) else await flights.settled(last)
        if not result.encoded:  # the blend, with no stage after it
            result = await call(self.provenance.encode.remote(result, how))  # type: ignore[attr-defined]
        return result

    @router.post("/extra-single-image", response_model=ExtrasResponse)
    async def extra_single_image(self, body: ExtrasRequest) -> Response:
        """Upscale (two blended upscalers) and restore faces in one image."""
        await self._check_upscalers(body)
        raw = image_bytes(body.image, "image")
        upload = await asyncio.to_thread(decode, raw, field="image")
        result = await self._extras(body, upload, raw, await answer_encoding(self.jobs))
        (image,), payloads = blobs(result.encoded[:1])
        return json_answer(ExtrasResponse(html_info=html_info(result.warnings), image=image), **payloads)

    @router.post("/extra-batch-images", response_model=ExtrasBatchResponse)
    async def extra_batch_images(self, body: ExtrasBatchRequest) -> Response:
        """The same as extra-single-image for a list of images."""
        await self._check_upscalers(body)
        files = [image_bytes(item.data, f"imageList.{i}.data") for i, item in enumerate(body.imageList)]
        images = [await asyncio.to_thread(decode, raw, field=f"imageList.{i}.data") for i, raw in enumerate(files)]
        how = await answer_encoding(self.jobs)  # one format for the whole batch
        out = [await self._extras(body, image, raw, how) for image, raw in zip(images, files, strict=True)]
        placeholders, payloads = blobs([result.encoded[0] for result in out])
        warnings = [f"image {i}: {w}" for i, result in enumerate(out) for w in result.warnings]
        return json_answer(ExtrasBatchResponse(html_info=html_info(warnings), images=placeholders), **payloads)


def html_info(warnings: list[str]) -> str:
    """A1111's ``html_info``, text as its page shows it (a paragraph, lines broken): here what the stages warned of
    (no face found, a fallback upscaler), so that a client can tell an image left unchanged; empty without."""
    lines = list(dict.fromkeys(warnings))
    return f"<p>{'<br>'.join(html.escape(line) for line in lines)}</p>" if lines else ""


def _blends(body: ExtrasRequest) -> bool:
    """Whether a second upscaler is blended in. As A1111: no first upscaler, no upscale at all, so nothing for a
    second one to blend with."""
    visibility = body.upscaler_2_visibility or body.extras_upscaler_2_visibility
    return body.upscaler_1 != "None" and body.upscaler_2 != "None" and visibility > 0
