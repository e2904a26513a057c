"""Seed 001: ``POST /v1/images/memory`` and ``/v1/images/subject``: a user's photo from S3 through IP-Adapter,
the result written back to S3 under ``generated/{user_id}/`` and answered as ``{"data": [{"s3_uri": ...}]}``. With
the NSFW filter on, a flagged illustration is never uploaded: the answer is 422 ``CONTENT_FLAGGED``."""

import asyncio
import uuid

from fastapi import APIRouter
from pydantic import BaseModel, Field

from deployments.support.errors import ContentFlagged
from deployments.support.settings import Settings
from graphs import flights, plans
from graphs.api.body import JSONBodyRoute
from graphs.api.checkpoints import CheckpointChoice
from graphs.api.errors import documented
from graphs.api.photos import PhotoStore, check_user_id

router = APIRouter(prefix="/v1/images", tags=["illustration"], route_class=JSONBodyRoute,
                   responses=documented(404, 503))  # no photo of the user; a model or S3 down


class SubjectRequest(BaseModel):
    user_id: str = Field(..., min_length=1, max_length=128)
    num_inference_steps: int | None = Field(None, ge=1, le=150)
    ip_adapter_scale: float | None = Field(None, ge=0.0, le=2.0)
    negative_prompt: str | None = Field(None, max_length=10_000)
    style_prompt: str | None = Field(None, max_length=10_000)


class MemoryRequest(SubjectRequest):
    prompt: str = Field(..., min_length=1, max_length=10_000)


class S3Object(BaseModel):
    s3_uri: str


class IllustrationResponse(BaseModel):
    data: list[S3Object]


class IllustrationRoutes(CheckpointChoice):
    handles: plans.Handles
    settings: Settings
    photos: PhotoStore

    async def _illustrate(self, body: SubjectRequest, kind: str, prefix: str, prompt: str) -> IllustrationResponse:
        check_user_id(body.user_id)
        photo = await asyncio.to_thread(self.photos.load_photo, prefix, body.user_id)
        request_id = uuid.uuid4().hex
        checkpoint = await self.checkpoint(None, "model")  # seed 001 names none: the default
        async with flights.flight():
            result = await plans.seed001(self.handles, body.model_dump(), prompt, photo, self.settings, request_id,
                                         checkpoint)
        if result.info.get("nsfw", [False])[0]:
            raise ContentFlagged("the safety checker flagged the illustration; nothing was stored",
                                 field="prompt" if kind == "memory" else "user_id", details={"nsfw": True})
        uri = await asyncio.to_thread(self.photos.save_generated, body.user_id, kind, result.encoded[0])
        return IllustrationResponse(data=[S3Object(s3_uri=uri)])

    @router.post("/memory", response_model=IllustrationResponse)
    async def memory(self, body: MemoryRequest) -> IllustrationResponse:
        """A memory illustration of the prompt, with the user's avatar as the IP-Adapter reference."""
        style = body.style_prompt if body.style_prompt is not None else self.settings.default_memory_style_prompt
        return await self._illustrate(body, "memory", self.settings.s3_avatar_prefix, f"{body.prompt}, {style}")

    @router.post("/subject", response_model=IllustrationResponse)
    async def subject(self, body: SubjectRequest) -> IllustrationResponse:
        """A portrait illustration of the user's subject photo."""
        style = body.style_prompt if body.style_prompt is not None else self.settings.default_subject_style_prompt
        return await self._illustrate(body, "subject", self.settings.s3_subject_prefix,
                                      f"professional portrait, {style}")
