"""Request fields without Ray (uploaded images, job submits, names): a hostile value is refused when the request
arrives, with the field named, or read as the sender meant; never an uncaught error the edge would answer 500,
nor one that fails the work later."""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from deployments.support import samplers
from deployments.support.errors import InvalidImage, InvalidInput
from deployments.support.imaging import ORIENTATION, decode, to_rgb
from graphs.api.fields import image_bytes, image_field
from graphs.api.photos import check_user_id
from graphs.api.processing import ClipFocalRequest, ProcessRequest, process_image
from graphs.jobs.models import AsyncGenerate, BatchSizes, Img2ImgJob, InpaintJob, StyleTransferJob, Text2ImgJob
from tests.helpers import decode_b64


@pytest.mark.parametrize("value", ["data:image/png;base64", "data:image/png", "data:"])
def test_a_data_uri_without_its_comma_is_an_invalid_image(value):
    for parse in (image_bytes, image_field):
        with pytest.raises(InvalidImage) as e:
            parse(value, "initImage")
        assert e.value.field == "initImage"


def _file(image: Image.Image, fmt: str, **options) -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return base64.b64encode(buffer.getvalue()).decode()


def _sideways() -> Image.Image:
    """100x50 as stored, red on the left and blue on the right; EXIF orientation 6 says: turn 90° clockwise."""
    image = Image.new("RGB", (100, 50), (255, 0, 0))
    image.paste((0, 0, 255), (50, 0, 100, 50))
    return image


def test_a_jpeg_is_decoded_upright_by_its_exif_orientation():
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    data = _file(_sideways(), "JPEG", exif=exif.tobytes())
    image = image_field(data, "initImage")
    assert image.size == (50, 100)
    top, bottom = image.getpixel((25, 10)), image.getpixel((25, 90))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # the left edge is now the top
    answer = process_image(image, ProcessRequest(image=data, operations=["sanitize"]))
    assert (answer.width, answer.height) == (50, 100)
    assert answer.metadata["strippedMetadata"].count("exif") == 1
    assert decode(base64.b64decode(data), turn=False).size == (100, 50)  # provenance reads the stored pixels


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])  # PIL reads a JPEG's broken block as empty
def test_an_unreadable_exif_block_is_stripped_not_a_500(fmt):
    data = _file(_sideways(), fmt, exif=b"XX\x00*\x00\x00\x00\x08\x00\x00")  # "not a TIFF file"
    image = image_field(data, "image")
    assert image.size == (100, 50)
    answer = process_image(image, ProcessRequest(image=data, operations=["sanitize"]))
    assert "exif" in answer.metadata["strippedMetadata"]
    assert "exif" not in decode_b64(answer.imageData).info


def test_a_16_bit_greyscale_png_keeps_its_tones():
    gradient = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    data = _file(Image.fromarray(gradient), "PNG")
    image = image_field(data, "image")
    assert image.mode == "L"
    assert np.array_equal(np.asarray(image), (gradient.astype(np.uint32) * 255 + 32767) // 65535)
    rgb = np.asarray(to_rgb(Image.fromarray(gradient)))  # not through decode: to_rgb scales as well
    assert rgb.shape == (64, 64, 3) and rgb.min() == 0 and rgb.max() == 255 and 120 < np.median(rgb) < 135
    sanitized = np.asarray(decode_b64(process_image(image, ProcessRequest(image=data, operations=["sanitize"]))
                                      .imageData))
    assert (sanitized == 255).mean() < 0.01


def test_a_focal_point_must_be_finite():
    # 1e400 is valid JSON that Python reads as inf; the crop box would then be inf too
    body = b'{"image": "x", "sizes": ["32x32"], "focalPoint": {"x": 1e400, "y": 5}}'
    for parse in (lambda: ClipFocalRequest.model_validate_json(body),
                  lambda: ClipFocalRequest.model_validate(json.loads(body)),
                  lambda: ClipFocalRequest(image="x", sizes=["32x32"], focalPoint={"x": 5, "y": math.nan})):
        with pytest.raises(ValidationError) as e:
            parse()
        assert e.value.errors()[0]["loc"][0] == "focalPoint"


@pytest.mark.parametrize("model", [Text2ImgJob, Img2ImgJob, InpaintJob])
@pytest.mark.parametrize(("changes", "field"), [
    ({"sampler": "definitely-not-a-sampler"}, "sampler"),
    ({"sampler": "Euler a Sideways"}, "sampler"),  # no schedule label of A1111's ("Euler a Karras" is one)
    ({"prompt": "a cat <lora:x:zz>"}, "prompt"),
    ({"prompt": "a cat <lora:x:99>"}, "prompt"),
])
def test_a_job_that_would_fail_later_is_refused_at_submit(model, changes, field):
    body = {"prompt": "a cat", "initImage": "x", "image": "x", "mask": "x", **changes}
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    assert e.value.errors()[0]["loc"] == (field,)


def test_the_other_job_bodies_check_their_prompt_and_sampler_too():
    for model, body in ((StyleTransferJob, {"contentImage": "x", "styleImage": "x"}),
                        (AsyncGenerate, {}), (BatchSizes, {"sizes": ["square"]})):
        with pytest.raises(ValidationError) as e:
            model.model_validate({**body, "prompt": "<lora:x:zz>"})
        assert e.value.errors()[0]["loc"] == ("prompt",)
    with pytest.raises(ValidationError):
        StyleTransferJob(contentImage="x", styleImage="x", sampler="bogus")


@pytest.mark.parametrize("sampler", ["euler_a", "EULER_A", "Euler a", "DPM++ 2M Karras", "dpm++_2m_karras", "DDIM"])
def test_every_sampler_spelling_the_scheduler_accepts_is_accepted(sampler):
    job = Text2ImgJob(prompt="a cat <lora:detail:0.5> <lora:style>", sampler=sampler)
    assert job.sampler == sampler and samplers.resolve(sampler)[0] in samplers.SAMPLERS


@pytest.mark.parametrize("user_id", ["bob\n", "bob\r\n", "a/b", "..", "a..b", "", "-bob", "b" * 129, "bob\x00"])
def test_a_user_id_that_could_bend_an_s3_key_is_refused(user_id):
    with pytest.raises(InvalidInput) as e:
        check_user_id(user_id)
    assert e.value.field == "user_id"


def test_a_plain_user_id_passes():
    assert check_user_id("bob.smith@example_1-2") == "bob.smith@example_1-2"
