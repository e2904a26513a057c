"""The bodies of the job submits (seed 003 camelCase, seed 002's async and batch), each field bounded once."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import AfterValidator, BaseModel, Field, field_validator

from deployments.support import samplers
from deployments.support.generation import parse_lora_tags
from graphs.api.control_fields import ControlNets
from graphs.api.fields import Guidance, Prompt, RequiredPrompt, Sampler, Seed, Side, Steps, Strength
from graphs.api.generate import GenerateRequest

MAX_OFFSET = 10**9  # beyond any store's row count; bigger numbers overflow SQLite's integers
JobId = Annotated[str, Path(max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="job_<ms>_<hex>")]
Priority = Literal["high", "normal", "low"]
PreviewEvery = Annotated[int | None, Field(ge=0, le=150, description=(
    "denoising steps between the job's preview events; 0: none; default JOB_PREVIEW_EVERY"))]


Checkpoint = Annotated[str | None, Field(max_length=256, description=(
    "the base checkpoint: a name from GET /models or an alias ('photorealistic', 'anime'); none: the default"))]


# A job runs long after its submit was answered: what would fail it there is refused here, naming the field.
def _known_sampler(name: str) -> str:
    samplers.resolve(name, field="sampler")
    return name


def _lora_tags(prompt: str) -> str:
    parse_lora_tags(prompt)  # a malformed <lora:name:weight> tag
    return prompt


KnownSampler = Annotated[Sampler, AfterValidator(_known_sampler)]
TaggedPrompt = Annotated[Prompt, AfterValidator(_lora_tags)]
RequiredTaggedPrompt = Annotated[RequiredPrompt, AfterValidator(_lora_tags)]


class _Submit(BaseModel):
    priority: Priority = "normal"
    webhookUrl: str | None = Field(None, max_length=2048)
    preview_every: PreviewEvery = None
    model: Checkpoint = None


class Text2ImgJob(_Submit):
    prompt: RequiredTaggedPrompt
    negativePrompt: Prompt = ""
    width: Side = 512
    height: Side = 512
    steps: Steps = 30
    guidanceScale: Guidance = 7.5
    seed: Seed = -1
    sampler: KnownSampler = "euler_a"
    controlnets: ControlNets = []


class Img2ImgJob(Text2ImgJob):
    initImage: str
    strength: Strength = 0.75


class InpaintJob(Text2ImgJob):
    image: str
    mask: str
    inpaintingStrength: Strength = 0.9
    steps: Steps = 40


class StyleTransferJob(_Submit):
    contentImage: str
    styleImage: str
    styleStrength: float = Field(0.7, ge=0.0, le=2.0)
    contentStrength: float = Field(0.3, ge=0.0, le=1.0)
    prompt: TaggedPrompt = ""
    steps: Steps = 30
    guidanceScale: Guidance = 7.5
    seed: Seed = -1
    sampler: KnownSampler = "euler_a"
    controlnets: ControlNets = []


class AsyncGenerate(GenerateRequest):
    """Seed 002's ``/generate/async``: a ``/generate`` body, queued."""

    priority: Priority = "normal"
    webhookUrl: str | None = Field(None, max_length=2048)
    preview_every: PreviewEvery = None

    @field_validator("prompt")
    @classmethod
    def lora_tags(cls, prompt: str) -> str:
        return _lora_tags(prompt)


class BatchSizes(BaseModel):
    webhookUrl: str | None = Field(None, max_length=2048)
    preview_every: PreviewEvery = None
    model: Checkpoint = None
    prompt: RequiredTaggedPrompt
    negativePrompt: Prompt = ""
    sizes: list[Annotated[str, Field(max_length=32)]] = Field(..., min_length=1, max_length=16)
    seed: Seed = -1
    priority: Priority = "normal"
    steps: Steps = 30
    guidanceScale: Guidance = 7.0
    derivatives: list[Annotated[int, Field(ge=8, le=4096)]] = Field(
        [], max_length=8, description="WebP widths cut from every size")
    baseSizes: dict[Literal["landscape", "square", "portrait"], tuple[Side, Side]] | None = Field(
        None, description="override the base rendered per aspect class (multiples of 8)")


class NamedSize(BaseModel):
    width: int
    height: int
    aspect: Literal["landscape", "square", "portrait"]


class SizeConfig(BaseModel):
    """What ``POST /generate/batch-sizes`` accepts by name, and the base rendered for each aspect class."""

    sizes: dict[str, NamedSize]
    bases: dict[str, tuple[int, int]]


class JobAccepted(BaseModel):
    """Seed 002's answer to a queued job."""

    jobId: str
    job_id: str
    status: str


class JobView(BaseModel):
    """Seed 003's job object, with seed 002's names and, for a finished batch, its images at the top level."""

    id: str
    jobId: str
    job_id: str
    type: str
    status: Literal["queued", "processing", "completed", "failed", "cancelled"]
    request: dict
    progress: int = Field(..., ge=0, le=100)
    priority: str
    createdAt: str | None
    startedAt: str | None
    completedAt: str | None
    error: str | None
    attempts: int
    result: dict | None = Field(None, description="images as data URIs (null: unreadable, see warnings), urls (the "
                                "same images as GET /jobs/{id}/images/{name}), seed, parameters, timeTaken, nsfw (one "
                                "flag per image; null: the filter is off), cached, warnings; a batch's images without "
                                "imageData and derivatives")
    images: dict | None = Field(None, description="a finished batch: per size, imageData, derivatives, url and "
                                "derivativeUrls")
    bases_generated: int | None = None
    seed: int | None = None


class JobEventData(BaseModel):
    """The JSON ``data`` of one server-sent event (``id:`` the event id, ``event:`` its name); fields beyond
    ``job_id``, ``status`` and ``time`` depend on the event (see graphs/jobs/events.py)."""

    job_id: str
    status: Literal["queued", "processing", "completed", "failed", "cancelled"]
    time: float = Field(..., description="epoch seconds")
    position: int | None = Field(None, description="queued: 1 = next to run")
    requeued: bool | None = None
    attempt: int | None = Field(None, description="started")
    step: int | None = Field(None, description="progress, preview")
    total: int | None = None
    eta_s: float | None = Field(None, description="progress: seconds left in this denoising pass")
    progress: float | None = Field(None, description="progress: percent")
    image: str | None = Field(None, description="preview: data:image/jpeg;base64,...")
    images: list[str] | None = Field(None, description="completed: image names, in GET /jobs/{id}'s order")
    seed: int | None = None
    links: dict[str, Any] | None = Field(None, description="completed: job and result URLs, and images: each "
                                         "image's URL (GET /jobs/{id}/images/{name}) by name")
    nsfw: list[bool | None] | None = Field(None, description="completed: the safety checker's flag per image")
    cached: bool | None = Field(None, description="completed: answered from the result cache")
    code: str | None = Field(None, description="failed")
    message: str | None = Field(None, description="failed")


class JobResult(BaseModel):
    imageData: str = Field(..., description="plain base64 PNG")
    format: str
    width: int
    height: int
    nsfw: bool | None = Field(None, description="flagged and replaced by the safety checker; absent: the filter is off")


class JobSummary(BaseModel):
    id: str
    type: str
    status: str
    createdAt: str | None
    progress: int


class JobList(BaseModel):
    jobs: list[JobSummary]
    total: int
    offset: int
    limit: int


class CancelResult(BaseModel):
    success: bool
    id: str
    status: str


class QueueStatus(BaseModel):
    queuedJobs: int
    processingJobs: int
    completedJobs: int
    failedJobs: int
    cancelledJobs: int
    averageProcessingTime: int = Field(..., description="milliseconds")
    maxQueueSize: int
