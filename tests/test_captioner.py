"""The captioner's plain class on the tiny BLIP: a caption of words comes back, the same for the same image and
another for another, its tokens within A1111's length bounds; the loader's refusals; the Serve shell."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch
from PIL import Image

from deployments.support.config import CaptionerConfig
from deployments.support.errors import ModelLoadError, UnsafeWeights


@pytest.fixture(scope="module")
def captioner(tiny):
    from deployments.captioner import BlipCaptioner

    return BlipCaptioner(CaptionerConfig(model=str(tiny / "captioner")))


def with_lengths(captioner, **lengths):
    """The same loaded model with other generation settings (the config is all ``tokens`` reads)."""
    from deployments.captioner import BlipCaptioner

    other = object.__new__(BlipCaptioner)
    other.__dict__.update(captioner.__dict__, config=captioner.config.model_copy(update=lengths))
    return other


def test_a1111s_interrogate_clip_defaults():
    config = CaptionerConfig(model="x")
    assert (config.num_beams, config.min_length, config.max_length) == (1, 24, 48)


def test_a_caption_of_words_comes_back_the_same_for_the_same_image(captioner, astronaut):
    caption = captioner.caption(astronaut)
    assert isinstance(caption, str) and len(caption.split()) >= 5 and caption == caption.strip()
    assert not any(token in caption for token in ("[DEC]", "[SEP]", "[PAD]", "[CLS]"))  # special tokens dropped
    assert captioner.caption(astronaut.copy()) == caption
    assert captioner.caption(astronaut.rotate(90)) != caption  # it reads the pixels


def test_tokens_start_with_dec_and_keep_a1111s_length_bounds(captioner, astronaut):
    tokenizer = captioner.processor.tokenizer
    tokens = captioner.tokens(astronaut)
    assert tokens[0] == tokenizer.convert_tokens_to_ids("[DEC]")
    assert 24 <= len(tokens) <= 48  # the start token counted, as A1111's BLIP counts it
    assert captioner.caption(astronaut) == tokenizer.decode(tokens, skip_special_tokens=True).strip()
    exact = with_lengths(captioner, min_length=10, max_length=10)
    assert len(exact.tokens(astronaut)) == 10
    short = with_lengths(captioner, min_length=2, max_length=5)
    assert 2 <= len(short.tokens(astronaut)) <= 5
    beams = with_lengths(captioner, num_beams=3, min_length=6, max_length=12)
    assert 6 <= len(beams.tokens(astronaut)) <= 12 and beams.caption(astronaut)


def test_any_image_mode_is_captioned_as_rgb(captioner, astronaut):
    grey = astronaut.convert("L")
    assert captioner.caption(grey) == captioner.caption(grey.convert("RGB"))
    transparent = Image.new("RGBA", (40, 30), (10, 200, 30, 0))  # fully transparent: the white it is shown on
    assert captioner.caption(transparent) == captioner.caption(Image.new("RGB", (40, 30), "white"))


@pytest.mark.parametrize("bad", [{"num_beams": 0}, {"min_length": 30, "max_length": 20}, {"max_length": 1},
                                 {"max_length": 513}, {"model": "x", "prompt": "a picture of"}])
def test_config_is_bounded(bad):
    with pytest.raises(ValueError):
        CaptionerConfig.model_validate({"model": "x", **bad})


def test_max_length_past_the_decoders_positions_is_refused_at_load(tiny):
    from deployments.captioner import BlipCaptioner

    with pytest.raises(ModelLoadError) as caught:
        BlipCaptioner(CaptionerConfig(model=str(tiny / "captioner"), max_length=65))  # the tiny decoder has 64
    assert caught.value.field == "captioner.max_length"


def test_the_loader_refuses_pickles_and_incomplete_captioners(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    from deployments.weights import loader

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny / "captioner", pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeWeights):
        loader.load_captioner(str(pickled), torch.float32)

    renamed = tmp_path / "renamed"  # a pickle under the safetensors name is refused by its header
    shutil.copytree(tiny / "captioner", renamed)
    (renamed / "model.safetensors").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeWeights, match="not a valid safetensors"):
        loader.load_captioner(str(renamed), torch.float32)

    partial = tmp_path / "partial"
    shutil.copytree(tiny / "captioner", partial)
    state = load_file(partial / "model.safetensors")
    del state["vision_model.post_layernorm.weight"]
    save_file(state, partial / "model.safetensors")
    with pytest.raises(ModelLoadError, match="post_layernorm") as caught:
        loader.load_captioner(str(partial), torch.float32)
    assert caught.value.field == "captioner.model"

    with pytest.raises(ModelLoadError, match="a captioner is a folder"):
        loader.load_captioner(str(tiny / "captioner" / "model.safetensors"), torch.float32)


def test_the_releases_pickle_beside_its_safetensors_is_never_opened(tiny, tmp_path, captioner, astronaut):
    """blip-image-captioning-large ships pytorch_model.bin and tf_model.h5 beside model.safetensors."""
    from deployments.captioner import BlipCaptioner

    release = tmp_path / "release"
    shutil.copytree(tiny / "captioner", release)
    (release / "pytorch_model.bin").write_bytes(b"\x80\x04would run code if unpickled")
    (release / "tf_model.h5").write_bytes(b"\x89HDF\r\n")
    again = BlipCaptioner(CaptionerConfig(model=str(release)))
    assert again.caption(astronaut) == captioner.caption(astronaut)


def test_the_serve_shell_captions_on_its_inference_thread(tiny, captioner, astronaut):
    from deployments.captioner import Captioner

    shell = Captioner.func_or_class({"model": str(tiny / "captioner"), "min_length": 4, "max_length": 9})

    async def run() -> tuple[str, dict]:
        await shell.check_health()
        return await shell.caption(astronaut), await shell.describe()

    caption, described = asyncio.run(run())
    assert caption == with_lengths(captioner, min_length=4, max_length=9).caption(astronaut)
    assert described == {"num_beams": 1, "min_length": 4, "max_length": 9, "device": "cpu", "dtype": "float32"}
