"""The named output sizes of multi-size batches (``configs/sizes.yaml``) and how they group into SDXL bases."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel

from deployments.support.cropping import CropSize
from deployments.support.errors import InvalidInput

MAX_SIDE = 4096  # an explicit WxH output size


class SizeTable(BaseModel):
    landscape_above: float
    portrait_below: float
    bases: dict[str, tuple[int, int]]
    sizes: dict[str, tuple[int, int]]

    @classmethod
    def load(cls, path: Path) -> SizeTable:
        return cls.model_validate(yaml.safe_load(path.read_text()))

    def aspect(self, width: int, height: int) -> str:
        ratio = width / height
        return "landscape" if ratio > self.landscape_above else "portrait" if ratio < self.portrait_below else "square"

    def resolve(self, names: list[str]) -> list[CropSize]:
        out = []
        for name in names:
            if name in self.sizes:
                out.append(CropSize(name=name, width=self.sizes[name][0], height=self.sizes[name][1]))
            elif re.fullmatch(r"[0-9]{1,5}x[0-9]{1,5}", name):
                width, height = (int(p) for p in name.split("x", 1))
                if not (8 <= width <= MAX_SIDE and 8 <= height <= MAX_SIDE):
                    raise InvalidInput(f"size {name!r}: each side must lie in 8..{MAX_SIDE}", field="sizes")
                out.append(CropSize(name=name, width=width, height=height))
            else:
                raise InvalidInput(f"unknown size {name!r}", field="sizes", details={"choices": list(self.sizes)})
        return out
