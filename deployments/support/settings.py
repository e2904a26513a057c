"""The one settings object: every environment value of every process, read once and passed down.

Field names are the environment names (pydantic-settings matches them case-insensitively), so a variable in the
README is the field of the same name here. Per-deployment model configuration is not here: it arrives typed
through ``serve_config.yaml`` (``deployments.support.config``).
"""

from __future__ import annotations

import functools
import re
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The payload of SDXL's reference watermark (Stability AI's generative-models and diffusers).
SDXL_WATERMARK_BITS = "101100111110110010010000011110111011000110011110"


def _cache() -> Path:
    return Path.home() / ".cache" / "imagegen"


def _sizes_file() -> Path:
    return Path(__file__).resolve().parents[2] / "configs" / "sizes.yaml"


def _networks(text: str) -> tuple[IPv4Network | IPv6Network, ...]:
    return tuple(ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    # --- models: where weights are cached and fetched from
    model_cache_dir: Path = Field(default_factory=lambda: _cache() / "models")
    hf_hub_cache: Path | None = Field(None, description="Hugging Face cache, read only")
    download_progress_seconds: float = Field(5.0, gt=0)

    # --- S3 (model downloads, seed 001 photos, job results): one endpoint and one region for all
    aws_endpoint_url: str | None = None
    aws_region: str = Field("us-east-1", validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION",
                                                                       "aws_region"))

    # --- the HTTP edge (seed 001 names)
    auth_enabled: bool = False
    auth_token: str = Field("", repr=False)
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1)
    request_timeout_seconds: float = Field(300.0, gt=0)
    cors_allow_origins: str = Field("", description=(
        "comma-separated origins (https://app.example.com, or *) whose pages may call the API from a browser, as "
        "A1111's --cors-allow-origins; empty: none"))
    cors_allow_origins_regex: str | None = Field(None, description=(
        "origins matching this regular expression may too (A1111's --cors-allow-origins-regex)"))
    png_compress_level: int = Field(
        1, ge=0, le=9, description="zlib level of every PNG the service writes: 1 is ~5x faster than 6 for ~15% more "
        "bytes on a photograph (see make bench)")

    # --- rate limits per client (bearer token, else address): tokens per second and bucket size, per budget
    rate_limits_enabled: bool = True
    rate_limit_generate_per_second: float = Field(1.0, gt=0, description="synchronous generation and processing")
    rate_limit_generate_burst: int = Field(30, ge=1)
    rate_limit_submit_per_second: float = Field(5.0, gt=0, description="job submits")
    rate_limit_submit_burst: int = Field(100, ge=1)
    rate_limit_read_per_second: float = Field(50.0, gt=0, description="polling, listings and the rest")
    rate_limit_read_burst: int = Field(500, ge=1)
    trusted_proxies: str = Field("", description=(
        "comma-separated addresses or CIDRs of the load balancers and ingress controllers in front of the service: "
        "from these peers alone X-Forwarded-For names the client (its right-most hop not in the list)"))

    # --- overlays (text and watermarks on /process and /generate)
    fonts_dir: Path | None = Field(None, description="TTF/OTF files an overlay may name; else PIL's own font")

    # --- provenance of generated images (deployments/support/provenance.py): an invisible watermark in the pixels
    # and C2PA content credentials in the file, added by the stage that encodes
    watermark_enabled: bool = Field(True, description="DWT-DCT watermark (invisible-watermark) on every image of at "
                                    "least 256x256 the service generates or edits")
    watermark_bits: str = Field(SDXL_WATERMARK_BITS, pattern=r"^[01]{8,256}$",
                                description="the payload, as 0s and 1s (default: the 48 bits SDXL's reference embeds)")
    watermark_luma_scale: float = Field(24.0, ge=0, le=128, description="quantisation step in the luma band; "
                                        "24 survives JPEG/WebP at quality 75 and above at about 46 dB PSNR")
    watermark_chroma_scale: float = Field(0.0, ge=0, le=128, description="step in the U band, where SDXL's reference "
                                          "embeds (36 there); fragile under lossy re-encoding; 0: not used")
    c2pa_cert_file: Path | None = Field(None, description="PEM certificate chain, signer first; without it and the "
                                        "key, no content credentials")
    c2pa_key_file: Path | None = Field(None, description="PEM private key of the signing certificate")
    c2pa_algorithm: Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"] = "es256"
    c2pa_tsa_url: str | None = Field(None, description="RFC 3161 timestamp authority asked at each signing")
    c2pa_trust_anchors_file: Path | None = Field(None, description="PEM roots whose credentials /provenance/verify "
                                                 "reports as trusted")

    # --- content safety and the result cache
    enable_nsfw_filter: bool = Field(False, description="seed 003's name: every generated image passes the safety "
                                     "checker (app args' safety_checker.enabled wins when set)")
    result_cache: bool = Field(False, description="answer an identical fixed-seed request from the result store")
    result_cache_max_bytes: int = Field(1 << 30, ge=1,
                                        description="the cache's size bound; the least recently used go first")
    result_cache_max_age_s: float = Field(24 * 3600, gt=0, description="entries older than this are misses")

    # --- jobs (seed 003 names; times in milliseconds where seed 003 has them so)
    jobs_data_dir: Path = Field(default_factory=lambda: _cache() / "data")
    job_store_url: str | None = Field(None, description="redis://host:port/db for a store shared by nodes")
    job_results_url: str | None = Field(None, description="s3://bucket/prefix; default files under the data dir")
    max_concurrent_jobs: int = Field(4, ge=1, le=64)
    max_queue_size: int = Field(100, ge=1)
    job_timeout: int = Field(300_000, ge=1000, description="milliseconds")
    job_lease_seconds: float = Field(30.0, gt=0)
    job_max_attempts: int = Field(3, ge=1)
    job_drain_seconds: float = Field(60.0, ge=0, description=(
        "a stopping runner (a redeploy, a scale-down) lets its running jobs finish this long, then releases the "
        "rest to the queue with no attempt spent; keep it below the JobRunner's graceful_shutdown_timeout_s"))
    job_save_attempts: int = Field(4, ge=1, le=10, description=(
        "tries of each image save while the result store is unavailable, the waits doubling from "
        "JOB_SAVE_BACKOFF_SECONDS and all within one JOB_LEASE_SECONDS; then the job goes back to the queue"))
    job_save_backoff_seconds: float = Field(0.5, gt=0)
    job_retention_seconds: float = Field(24 * 3600, gt=0)
    job_poll_seconds: float = Field(0.2, gt=0)
    jobs_per_token: bool = Field(False, description="a job is visible only to the bearer token that made it")
    batch_sizes_file: Path = Field(default_factory=_sizes_file)

    # --- job events (GET /jobs/{id}/events)
    job_events_kept: int = Field(256, ge=8, le=10_000, description="events kept per job; the oldest are trimmed")
    job_preview_every: int = Field(5, ge=0, le=150, description="denoising steps between previews; 0: none")
    job_events_heartbeat_seconds: float = Field(10.0, gt=0, description="': ping' on an idle stream")
    inference_stall_seconds: float = Field(900.0, gt=0, description=(
        "a model replica whose inference thread has run one call this long fails its health check and is "
        "replaced; a checkpoint load at run time, with its compile warm-up, may take four times as long"))
    job_events_max_streams: int = Field(32, ge=0, description=(
        "event streams one ingress replica serves at once (each holds one of its max_ongoing_requests for its "
        "whole life); past it GET /jobs/{id}/events is a 503 STREAMS_BUSY and clients poll; 0: no limit"))
    job_events_poll_seconds: float = Field(0.25, gt=0, description="how often a stream reads the store")

    # --- webhooks
    webhook_allow_hosts: str = Field("", description="comma-separated hosts exempt from the address checks")
    webhook_attempts: int = Field(4, ge=1, le=10)
    webhook_backoff_seconds: float = Field(1.0, gt=0)
    webhook_timeout_seconds: float = Field(10.0, gt=0, description="a delivery attempt's whole time")

    # --- seed 001 illustrations
    s3_bucket_name: str = "auto-bio-illustrations"
    s3_avatar_prefix: str = "avatars/"
    s3_subject_prefix: str = "subjects/"
    s3_generated_prefix: str = "generated/"
    illustration_size: int = Field(1024, ge=256, le=2048, multiple_of=8)
    default_num_inference_steps: int = Field(50, ge=1, le=150)
    default_ip_adapter_scale: float = Field(0.33, ge=0.0, le=2.0)
    default_negative_prompt: str = "error, glitch, mistake"
    default_memory_style_prompt: str = "highest quality, monochrome, professional sketch, personal, nostalgic, clean"
    default_subject_style_prompt: str = "highest quality, professional sketch, monochrome"

    @model_validator(mode="after")
    def provenance_pairs(self) -> Settings:
        if (self.c2pa_cert_file is None) != (self.c2pa_key_file is None):
            raise ValueError("C2PA_CERT_FILE and C2PA_KEY_FILE go together")
        if self.watermark_enabled and not (self.watermark_luma_scale or self.watermark_chroma_scale):
            raise ValueError("WATERMARK_ENABLED needs WATERMARK_LUMA_SCALE or WATERMARK_CHROMA_SCALE above 0")
        return self

    @field_validator("cors_allow_origins_regex")
    @classmethod
    def origins_compile(cls, value: str | None) -> str | None:
        if value is not None:
            re.compile(value)  # re.error is a ValueError: refused at start-up
        return value

    def cors_origins(self) -> list[str]:
        return [o.strip() for o in self.cors_allow_origins.split(",") if o.strip()]

    @field_validator("trusted_proxies")
    @classmethod
    def proxies_parse(cls, value: str) -> str:
        _networks(value)  # a typo is refused at start-up, not on every request
        return value

    @functools.cached_property
    def trusted_networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        return _networks(self.trusted_proxies)

    def webhook_hosts(self) -> set[str]:
        return {h.strip().lower() for h in self.webhook_allow_hosts.split(",") if h.strip()}


@functools.cache
def current() -> Settings:
    """This process's settings, read from the environment on first use (in the serving process: the app object
    itself is built, and pickled, elsewhere)."""
    return Settings()
