"""A1111's infotext, the ``parameters`` text chunk of every PNG it writes: the prompt, an optional ``Negative
prompt:`` line, then one line of comma-separated ``Key: value`` settings, a value holding a comma, a colon or a
line break written as a JSON string (A1111's ``quote``)."""

from __future__ import annotations

import json

from graphs.api.a1111_models import Txt2ImgRequest


def quote(value: object) -> str:
    """A setting's value as A1111 writes it: as is, or as a JSON string when it would break the settings line."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def infotext(r: Txt2ImgRequest, seed: int, model: str, sampler: str, extra: dict | None = None) -> str:
    """The infotext of one image of ``r``: its ``seed``, the checkpoint ``model`` and the ``sampler`` that ran."""
    settings = {"Steps": r.steps, "Sampler": sampler, "Schedule type": r.scheduler or "Automatic",
                "CFG scale": r.cfg_scale, "Seed": seed, "Size": f"{r.width}x{r.height}", "Model": model}
    settings.update(extra or {})
    lines = [r.prompt]
    if r.negative_prompt:
        lines.append(f"Negative prompt: {r.negative_prompt}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in settings.items() if value is not None))
    return "\n".join(lines)
