"""How bodies are read and image answers written (graphs/api/body.py): hostile JSON refused naming ``body`` before
it costs memory or the event loop; answers serialised once, large base64 payloads spliced in as bytes."""

from __future__ import annotations

import base64
import json
import os
import threading

import pydantic_core
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient

from deployments.support.errors import InvalidInput
from graphs.api import body
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


@pytest.mark.parametrize("raw", [
    b"[" + b"[]," * 200_000 + b"[]]",
    b'{"prompt": "a", "x": [' + b"{}," * 200_000 + b"{}]}",
    b"[" + b"0," * 200_000 + b"0]",
])
def test_a_body_of_too_many_values_is_refused_before_it_is_parsed(raw, monkeypatch):
    monkeypatch.setattr(body.json, "loads", None)  # never reached: the refusal costs no Python objects
    with pytest.raises(InvalidInput) as e:
        body.parse_json(raw)
    assert e.value.field == "body" and e.value.details["limit_values"] == body.MAX_VALUES


def test_commas_and_brackets_inside_strings_are_not_values():
    prompt = "a, [b], {c}, " * 50_000
    assert body.parse_json(json.dumps({"prompt": prompt, "n": [1, 2]}).encode()) == {"prompt": prompt, "n": [1, 2]}


@pytest.mark.parametrize("raw", [
    rb'{"prompt": "a cat \ud800"}',
    rb'{"prompt": "cat", "override_settings": {"CLIP_stop_at_last_layers": "\udfff"}}',
    rb'{"override_settings": {"\uD800": 1}}',
])
def test_a_lone_surrogate_is_refused_naming_the_body(raw):
    with pytest.raises(InvalidInput) as e:
        body.parse_json(raw)
    assert e.value.field == "body"


def test_escaped_pairs_and_backslashes_are_plain_text():
    value = body.parse_json(rb'{"prompt": "\ud83d\ude00 \\ud800", "\u00e9": ["\u00e9"]}')
    assert value == {"prompt": "\N{GRINNING FACE} \\ud800", "é": ["é"]}
    pydantic_core.to_json(value)  # what json_answer does with an echo of it


def test_a_large_body_is_parsed_off_the_event_loop(monkeypatch):
    parsers, loop = [], []

    def parse(raw: bytes):
        parsers.append(threading.current_thread())
        return json.loads(raw)

    monkeypatch.setattr(body, "parse_json", parse)
    router = APIRouter(route_class=body.JSONBodyRoute)

    @router.post("/echo")
    async def echo(payload: dict) -> dict:
        loop.append(threading.current_thread())
        return {"n": len(payload["prompt"])}

    app = FastAPI()
    app.include_router(router)
    client = TestClient(app)
    big = "x" * (body.OFF_LOOP_BYTES + 1)
    assert client.post("/echo", json={"prompt": "x"}).json() == {"n": 1}
    assert client.post("/echo", json={"prompt": big}).json() == {"n": len(big)}
    assert parsers[0] is loop[0]  # a small body: not worth a thread
    assert parsers[1] is not loop[1]


def finishes(work, seconds: float) -> bool:
    """Whether ``work()`` returns (or raises) within ``seconds``: a guard against a hostile input that would hold a
    core for minutes, far past any honest input's milliseconds."""
    done = threading.Event()

    def run():
        try:
            work()
        except Exception:  # noqa: BLE001 - the outcome is asserted elsewhere; here only that it ends
            pass
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(seconds)


def test_counting_values_is_linear_in_the_body_whatever_its_strings():
    """Past the first count, strings are struck before counting again: an unterminated one full of escaped quotes
    made that strike quadratic (a 260 KB body held the ingress's GIL for 47 s)."""
    hostile = b"[" + b"," * (body.MAX_VALUES + 1) + b'"' + b'\\"' * 200_000
    assert finishes(lambda: body.parse_json(hostile), 10)
    with pytest.raises(InvalidInput) as e:
        body.parse_json(hostile)
    assert e.value.field == "body"
