"""The ControlNet extension's own routes (Mikubill/sd-webui-controlnet's ``/controlnet/*``): its API version, the
base's ControlNets, the preprocessors with their sliders, and ``detect`` (a preprocessor's maps of images), which
runs on a base replica: OpenCV and the depth, line-art, pose, soft-edge and M-LSD models stay out of the ingress. Its
units on txt2img and img2img are read in ``graphs/api/a1111_controlnet.py``."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import APIRouter
from pydantic import BaseModel, Field

from deployments.support import lineart, model_free, softedge
from deployments.support.control import MAX_UNITS, SLIDERS, Slider, offered, read
from deployments.support.errors import InvalidInput
from graphs import flights
from graphs.api.a1111_controlnet import A1111Unit, module_of, sliders
from graphs.api.a1111_models import _A1111, MAX_IMAGES
from graphs.api.body import JSONBodyRoute
from graphs.api.errors import call, documented
from graphs.api.fields import b64_png, image_field

if TYPE_CHECKING:
    from graphs.app import AppArgs
    from graphs.plans import Handles

router = APIRouter(prefix="/controlnet", tags=["controlnet"], route_class=JSONBodyRoute)

API_VERSION = 2  # what the extension's /controlnet/version answers; clients check it is there, not its value


class DetectRequest(_A1111):
    controlnet_module: str = Field("none", max_length=128)
    controlnet_input_images: list[str] = Field([], max_length=MAX_IMAGES)
    controlnet_images: list[str] = Field([], max_length=MAX_IMAGES, description="read where controlnet_input_images "
                                         "is empty: webuiapi's controlnet_detect sends its images so")
    controlnet_processor_res: int = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: list[str] = Field([], max_length=MAX_IMAGES, description="not read: no preprocessor here "
                                        "takes a mask")
    low_vram: bool = False


class Detected(BaseModel):
    images: list[str]
    info: str


class Version(BaseModel):
    version: int


class ModelList(BaseModel):
    model_list: list[str]


class ModuleList(BaseModel):
    module_list: list[str]
    module_detail: dict[str, dict]


class Settings(BaseModel):
    control_net_unit_count: int


def _slider(slider: Slider) -> dict:
    return {"name": slider.label, "value": slider.default, "min": slider.low, "max": slider.high, "step": slider.step}


def module_detail(module: str) -> dict:
    """A preprocessor's ``module_detail`` as the extension answers it: the sliders it shows (``control.SLIDERS``; a
    value it fixes, shuffle's resolution, has none), in the order of processor_res, threshold_a, threshold_b."""
    return {"model_free": False, "sliders": [_slider(s) for s in SLIDERS[module] if s is not None and s.shown]}


# The extension's internal keys and labels where they are not our names (module_list lists its keys, or its labels).
KEYS = {"depth_midas": "depth", **lineart.KEYS, **softedge.KEYS, **model_free.KEYS}
LABELS = {"invert": "invert (from white bg & black line)", **lineart.LABELS}


class ControlNetRoutes:
    config: AppArgs
    handles: Handles
    _controlnet_titles: list[str] | None = None  # a base replica's answer, kept: the ControlNets load once

    @router.get("/version", response_model=Version)
    async def controlnet_version(self) -> dict:
        """The extension's API version."""
        return {"version": API_VERSION}

    @router.get("/model_list", response_model=ModelList)
    async def controlnet_model_list(self, update: bool = True) -> dict:
        """The base's ControlNets as the extension lists them, ``name [hash]`` (``update`` is accepted: the list is
        the config's, and a unit may name either form)."""
        if not self.config.base.controlnets:
            return {"model_list": []}
        if self._controlnet_titles is None:  # hashed by a base replica as it loaded them; asked once here
            self._controlnet_titles = await call(self.handles.base.controlnet_titles.remote())
        return {"model_list": self._controlnet_titles}

    @router.get("/module_list", response_model=ModuleList)
    async def controlnet_module_list(self, alias_names: bool = False) -> dict:
        """The preprocessors offered (a depth, line-art, pose, soft-edge or M-LSD one where its model is configured),
        with their sliders' defaults and bounds: by the extension's keys, or (``alias_names``) by its labels."""
        names = {m: (LABELS.get(m, m) if alias_names else KEYS.get(m, m))
                 for m in offered(self.config.base.preprocessors)}
        return {"module_list": list(names.values()),
                "module_detail": {name: module_detail(m) for m, name in names.items()}}

    @router.get("/settings", response_model=Settings)
    async def controlnet_settings(self) -> dict:
        """How many units a request may enable."""
        return {"control_net_unit_count": MAX_UNITS}

    @router.post("/detect", response_model=Detected, responses=documented(400))
    async def controlnet_detect(self, body: DetectRequest) -> dict:
        """Each image's control map by a preprocessor, at its processor resolution where it reads one, with its
        sliders (shuffle drawn from seed 0: the request has none), base64 PNG."""
        unit = A1111Unit(module=body.controlnet_module, processor_res=body.controlnet_processor_res,
                         threshold_a=body.controlnet_threshold_a, threshold_b=body.controlnet_threshold_b)
        module = module_of(body.controlnet_module, "controlnet_module", offered(self.config.base.preprocessors))
        name = "controlnet_input_images" if body.controlnet_input_images or not body.controlnet_images \
            else "controlnet_images"
        sent = getattr(body, name)
        if not sent:
            raise InvalidInput("no image sent", field="controlnet_input_images")
        images = await asyncio.to_thread(lambda: [image_field(data, f"{name}[{i}]") for i, data in enumerate(sent)])
        used = read(module, *sliders(unit, module))  # those it reads, reset as the extension resets them
        async with flights.flight():  # a deadline or a disconnect cancels it, as the generations' stages
            maps = await call(self.handles.base.detect.remote(module, images, used["processor_res"],
                                                              used["threshold_a"], used["threshold_b"]))
        return {"images": await asyncio.to_thread(lambda: [b64_png(m) for m in maps]), "info": "Success"}
