"""The application graph: a FastAPI ingress bound to the model deployments (the six of the generation plans, and
the Captioner behind A1111's interrogate) and Provenance, which marks and reads provenance where the ingress and
job runner cannot.

``build_app(args)`` is the ``import_path`` target of ``serve_config.yaml``; its ``args`` validate into
``AppArgs``. Strings in args may use ``$VAR`` / ``~``, expanded once here, so one config file can point at model
folders per machine. Resources, replicas and autoscaling live in the config's ``deployments:`` section.

Routes live in one module per API family; the ``Ingress`` deployment inherits them and holds the handles. The
progress board (``graphs/board.py``) is where the diffusion replicas report progress and learn of cancels.
"""

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve
from ray.serve import Application

from deployments.support.checkpoints import Catalog
from deployments.support.config import (
    CaptionerConfig,
    FaceRestorerConfig,
    FocalCropperConfig,
    SafetyCheckerConfig,
    SDXLBaseConfig,
    SDXLRefinerConfig,
    UpscalerConfig,
)
from deployments.support.logs import replica_logging
from deployments.support.settings import current
from graphs import availability, plans
from graphs.api import (
    a1111,
    a1111_extras,
    a1111_info,
    controlnet,
    generate,
    illustration,
    jobs,
    processing,
    provenance,
    ui,
)
from graphs.api.a1111_styles import PromptStyles
from graphs.api.edge import create_app
from graphs.api.photos import PhotoStore, StorageConfig
from graphs.board import ProgressBoard
from graphs.jobs.cache import RequestCache, open_cache
from graphs.jobs.events import Streams
from graphs.jobs.results import open_results
from graphs.jobs.runner import JobRunner
from graphs.jobs.sizes import SizeTable
from graphs.jobs.store import open_store


def _expand(value):
    if isinstance(value, str):
        return os.path.expanduser(os.path.expandvars(value))
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    base: SDXLBaseConfig
    refiner: SDXLRefinerConfig | None = None
    upscaler: UpscalerConfig = UpscalerConfig()
    face_restorer: FaceRestorerConfig = FaceRestorerConfig()
    focal_cropper: FocalCropperConfig = FocalCropperConfig()
    safety_checker: SafetyCheckerConfig | None = Field(
        None, description="the NSFW filter's model, deployed whenever given; it screens while enabled")
    captioner: CaptionerConfig | None = Field(
        None, description="the image captioner behind A1111's /interrogate, deployed whenever given")
    result_cache: bool | None = Field(None, description="answer repeated fixed-seed requests from the result store; "
                                      "None: the RESULT_CACHE setting")
    hires_upscaler: str = Field("R-ESRGAN 2x+", description="upscaler name used by hires fix when neural is asked")
    prompt_styles: Path | None = Field(
        None, description="A1111's styles.csv (name, prompt, negative_prompt) on the ingress hosts, applied by name "
        "in A1111's styles field; read again when it changes")
    deployment_options: dict[str, dict] = Field(
        {}, description="per-deployment .options() for programmatic use; serve_config.yaml's deployments: "
        "section is the usual place for resources and autoscaling",
    )

    @model_validator(mode="before")
    @classmethod
    def expand_env(cls, data):
        return _expand(data)

    @field_validator("prompt_styles")
    @classmethod
    def from_the_project(cls, path: Path | None) -> Path | None:
        """A relative styles file is the project's (``configs/styles.csv``), wherever the replica's process runs."""
        return Path(__file__).resolve().parents[1] / path if path is not None and not path.is_absolute() else path


app = create_app()
app.include_router(generate.open_router)
for module in (generate, illustration, processing, a1111, a1111_extras, a1111_info, controlnet, jobs, provenance, ui):
    app.include_router(module.router)
app.include_router(a1111_info.internal)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress(app)
class Ingress(
    generate.GenerateRoutes,
    illustration.IllustrationRoutes,
    processing.ProcessingRoutes,
    a1111.A1111Routes,
    a1111_extras.A1111ExtrasRoutes,
    a1111_info.A1111InfoRoutes,
    controlnet.ControlNetRoutes,
    jobs.JobRoutes,
    provenance.ProvenanceRoutes,
):
    def __init__(self, base, refiner, upscaler, faces, cropper, runner, board, args: dict, safety=None,
                 marks=None, captioner=None) -> None:
        replica_logging()  # before anything here logs
        config = AppArgs.model_validate(args)
        self.config = config
        self.settings = current()  # read once, in the serving process
        enabled = config.safety_checker.enabled if config.safety_checker else None
        self.handles = plans.Handles(base, refiner, upscaler, faces, board,
                                     plans.safety_stage(safety, enabled, self.settings))
        self.cropper = cropper
        self.provenance = marks  # marks and encodes A1111's images, reads uploads' marks
        self.captioner = captioner  # A1111's interrogate; None where the config names no captioner
        self.hires_upscaler = config.hires_upscaler
        self.styles = PromptStyles(config.prompt_styles)
        self.photos = PhotoStore(StorageConfig.from_settings(self.settings))
        self.runner = runner  # deployed with the app; it reads the same job store
        self.jobs = open_store(self.settings)
        self.streams = Streams(self.settings.job_events_max_streams)  # the job event streams this replica serves
        self.results = open_results(self.settings)
        self.cache = RequestCache(open_cache(self.settings, config.result_cache), self.handles, self.settings)
        self.sizes = SizeTable.load(self.settings.batch_sizes_file)
        self.catalog = Catalog(config.base, self.settings)  # the base replicas' checkpoints, resolved here
        availability.start()  # stage calls to a deployment that failed to deploy are refused, not queued


def build_app(args: dict) -> Application:
    """Bind the ingress to one handle per model deployment."""
    # Imported here, not at the top: Serve imports this module in the ingress and job-runner replicas, which must
    # stay free of torch and the model libraries (tests/test_light_ingress.py).
    from deployments.captioner import Captioner
    from deployments.face_restorer import FaceRestorer
    from deployments.focal_cropper import FocalCropper
    from deployments.provenance import Provenance
    from deployments.safety_checker import SafetyChecker
    from deployments.sdxl_base import SDXLBase
    from deployments.sdxl_refiner import SDXLRefiner
    from deployments.upscaler import Upscaler

    config = AppArgs.model_validate(args)

    def deployment(cls):
        return cls.options(**config.deployment_options.get(cls.name, {}))

    board = deployment(ProgressBoard).bind()
    base = deployment(SDXLBase).bind(config.base.model_dump(), board)
    refiner = deployment(SDXLRefiner).bind(config.refiner.model_dump(), board) if config.refiner else None
    upscaler = deployment(Upscaler).bind(config.upscaler.model_dump())
    faces = deployment(FaceRestorer).bind(config.face_restorer.model_dump())
    cropper = deployment(FocalCropper).bind(config.focal_cropper.model_dump())
    checker = config.safety_checker
    # Whether it screens is the ingress's and runner's business (bound apart from the checker's own config; a
    # `serve deploy` of changed args still replaces every replica, as any change under `args:` does).
    safety = deployment(SafetyChecker).bind(checker.model_dump(exclude={"enabled"})) if checker else None
    marks = deployment(Provenance).bind()
    captioner = deployment(Captioner).bind(config.captioner.model_dump()) if config.captioner else None
    runner = deployment(JobRunner).bind(base, refiner, upscaler, faces, cropper, board, config.hires_upscaler,
                                        safety=safety, safety_enabled=checker.enabled if checker else None,
                                        result_cache=config.result_cache, marks=marks)
    return deployment(Ingress).bind(base, refiner, upscaler, faces, cropper, runner, board, config.model_dump(),
                                    safety=safety, marks=marks, captioner=captioner)
