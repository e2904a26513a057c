"""``POST /provenance/verify``: both provenance marks of an uploaded image, the invisible watermark and the C2PA
content credentials (``deployments.support.provenance``). The reading runs in the ``Provenance`` deployment, since
it needs OpenCV and c2pa, which the ingress never imports."""

from fastapi import APIRouter
from pydantic import BaseModel, Field

from deployments.support.provenance import Verification
from graphs.api.body import JSONBodyRoute
from graphs.api.errors import call, documented
from graphs.api.fields import image_bytes

router = APIRouter(prefix="/provenance", tags=["provenance"], route_class=JSONBodyRoute)


class VerifyRequest(BaseModel):
    image: str = Field(..., description="base64 or data URI of the file as it was received (PNG, JPEG or WebP): "
                       "re-encoding it would drop its content credentials")


class ProvenanceRoutes:
    provenance: object

    @router.post("/verify", response_model=Verification, responses=documented(400, 503))
    async def verify(self, body: VerifyRequest) -> Verification:
        """Read an image's invisible watermark (and its payload) and check its C2PA content credentials."""
        data = image_bytes(body.image, "image")
        return await call(self.provenance.verify.remote(data, "image"))  # type: ignore[attr-defined]
