"""How image answers are written (graphs/api/body.py): serialised once, large base64 payloads spliced in as bytes."""

from __future__ import annotations

import base64
import json
import os

from graphs.api.body import blob, blobs, json_answer
from graphs.api.generate import GenerateResponse


def answer(prompt: str, data: bytes) -> dict:
    (png,), payloads = blobs([data])
    model = GenerateResponse(
        success=True, image=f"data:image/png;base64,{png}", prompt=prompt, enhanced_prompt=prompt, seed=1,
        refiner_applied=False, hires_fix_applied=False, face_restoration_applied=False, overlay_applied=False,
        cached=False, upscaler=None, final_resolution="8x8", generation_time_seconds=0.1, model="SDXL",
        checkpoint="c", warnings=[], imageData=png, format="png", width=8, height=8)
    response = json_answer(model, **payloads)
    assert response.media_type == "application/json"
    return json.loads(response.body)


def test_the_payload_lands_in_both_image_fields_and_the_answer_validates():
    png = os.urandom(3000)
    body = answer('a "quoted" prompt \\ with ünicode', png)
    assert body["image"] == "data:image/png;base64," + base64.b64encode(png).decode()
    assert base64.b64decode(body["imageData"]) == png
    assert body["prompt"] == 'a "quoted" prompt \\ with ünicode'
    GenerateResponse.model_validate(body)


def test_a_client_cannot_write_a_placeholder_of_its_own():
    guesses = "@@blob:file0@@ @@file0@@ " + blob("other")  # a name given no payload: never replaced
    body = answer(guesses, b"\x89PNG")
    assert body["prompt"] == guesses

