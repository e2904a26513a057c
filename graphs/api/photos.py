"""Object storage for seed 001: user photos in, generated images out, on S3 (any S3-compatible endpoint)."""

from __future__ import annotations

import io
import logging
import re
import uuid

from PIL import Image
from pydantic import BaseModel, Field

from deployments.support.errors import InvalidInput, NotFound, StorageUnavailable
from deployments.support.imaging import decode
from deployments.support.settings import Settings
from deployments.weights.loader import s3_client

logger = logging.getLogger(__name__)

USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")  # whole: fullmatch ($ would let "bob\n" through)
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class StorageConfig(BaseModel):
    """Defaults from seed 001's environment (S3_BUCKET_NAME, S3_*_PREFIX, AWS_REGION)."""

    bucket: str = Field("auto-bio-illustrations", min_length=3, max_length=63)
    avatar_prefix: str = "avatars/"
    subject_prefix: str = "subjects/"
    generated_prefix: str = "generated/"
    region: str = "us-east-1"
    endpoint_url: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> StorageConfig:
        return cls(bucket=settings.s3_bucket_name, avatar_prefix=settings.s3_avatar_prefix,
                   subject_prefix=settings.s3_subject_prefix, generated_prefix=settings.s3_generated_prefix,
                   region=settings.aws_region, endpoint_url=settings.aws_endpoint_url)


def check_user_id(user_id: str) -> str:
    if ".." in user_id or not USER_ID.fullmatch(user_id):
        raise InvalidInput("user_id may hold letters, digits and _.@- only (no '/', '..' or control characters)",
                           field="user_id")
    return user_id


class PhotoStore:
    def __init__(self, config: StorageConfig, client=None) -> None:
        self.config = config
        self._client = client

    @property
    def client(self):
        if self._client is None:
            # Requests wait on this: shorter reads and fewer retries than a model download.
            self._client = s3_client(self.config.endpoint_url, self.config.region, read_timeout=30, attempts=2)
        return self._client

    def load_photo(self, prefix: str, user_id: str) -> Image.Image:
        """The photo at ``{prefix}{user_id}.{png,jpg,jpeg,webp}``, else the first one in ``{prefix}{user_id}/``."""
        from botocore.exceptions import BotoCoreError, ClientError

        check_user_id(user_id)
        try:
            keys = [f"{prefix}{user_id}{suffix}" for suffix in PHOTO_SUFFIXES]
            listing = self.client.list_objects_v2(Bucket=self.config.bucket, Prefix=f"{prefix}{user_id}")
            present = {o["Key"] for o in listing.get("Contents", [])}
            key = next((k for k in keys if k in present), None)
            if key is None:
                key = next((k for k in sorted(present) if k.startswith(f"{prefix}{user_id}/")
                            and k.lower().endswith(PHOTO_SUFFIXES)), None)
            if key is None:
                raise NotFound(f"no photo for user {user_id!r} under s3://{self.config.bucket}/{prefix}",
                               field="user_id")
            data = self.client.get_object(Bucket=self.config.bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError) as e:
            raise _unavailable("reading the photo of", user_id, e) from e
        return decode(data, field="user_id")

    def save_generated(self, user_id: str, kind: str, png: bytes) -> str:
        """Upload a PNG (encoded by the stage that made it)."""
        from botocore.exceptions import BotoCoreError, ClientError

        key = f"{self.config.generated_prefix}{check_user_id(user_id)}/{kind}_{uuid.uuid4().hex[:12]}.png"
        try:
            # put_object sends the whole body with its length: the object appears complete or not at all.
            self.client.put_object(Bucket=self.config.bucket, Key=key, Body=io.BytesIO(png),
                                   ContentType="image/png")
        except (BotoCoreError, ClientError) as e:
            raise _unavailable("saving the image of", user_id, e) from e
        return f"s3://{self.config.bucket}/{key}"


def _unavailable(doing: str, user_id: str, error: Exception) -> StorageUnavailable:
    """The client learns that S3 failed; the log, not the answer, gets the endpoint and the reason."""
    logger.warning("S3 failed %s user %s: %s", doing, user_id, error)
    return StorageUnavailable("photo storage unavailable")
