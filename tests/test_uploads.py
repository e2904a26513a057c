"""Uploaded images and the small fields around them, without Ray: hostile values are refused with the field
named (or read as the sender meant), never an uncaught error that the edge would answer 500."""

from __future__ import annotations

import pytest

from deployments.support.errors import InvalidImage
from graphs.api.fields import image_bytes, image_field


@pytest.mark.parametrize("value", ["data:image/png;base64", "data:image/png", "data:"])
def test_a_data_uri_without_its_comma_is_an_invalid_image(value):
    for parse in (image_bytes, image_field):
        with pytest.raises(InvalidImage) as e:
            parse(value, "initImage")
        assert e.value.field == "initImage"
