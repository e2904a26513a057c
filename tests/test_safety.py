"""The safety checker's plain class on the tiny models: the known generation is flagged and replaced (black or
blurred pixels), every other image passes untouched; the loader's refusals; the Serve shell encodes as the last
stage; content hashes of loaded weights."""

from __future__ import annotations

import asyncio
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageFilter

from deployments.factory.safety import FLAGGED
from deployments.support.config import SafetyCheckerConfig
from deployments.support.errors import InvalidInput, ModelLoadError, UnsafeWeights
from deployments.support.generation import Encoding, GenerationRequest, StageResult
from tests.helpers import b64, pixels


@pytest.fixture(scope="module")
def checker(tiny):
    from deployments.safety_checker import ContentFilter

    return ContentFilter(SafetyCheckerConfig(model=str(tiny / "safety-checker")))


@pytest.fixture(scope="module")
def generations(base):
    """The flagged generation, and the same request with the next seed (a benign one)."""
    flagged = base.generate(GenerationRequest(**FLAGGED)).images[0]
    benign = base.generate(GenerationRequest(**{**FLAGGED, "seed": FLAGGED["seed"] + 1})).images[0]
    return flagged, benign


def high_frequency(image: Image.Image) -> float:
    """Mean absolute difference between horizontally adjacent pixels."""
    return float(np.abs(np.diff(pixels(image.convert("RGB")), axis=1)).mean())


def test_the_known_generation_is_flagged_and_blacked_out_the_other_untouched(checker, generations):
    flagged, benign = generations
    result = checker.check(StageResult(images=[flagged, benign], seeds=[13, 14], warnings=["earlier"]))
    assert result.info["nsfw"] == [True, False]
    assert result.seeds == [13, 14] and result.warnings[0] == "earlier"
    assert result.warnings[1:] == ["image 1 of 2 flagged by the safety checker: replaced by a black image"]
    assert result.images[0].size == flagged.size and pixels(result.images[0]).max() == 0
    assert np.array_equal(pixels(result.images[1]), pixels(benign))


def test_blur_replacement_keeps_the_colours_and_loses_the_detail(tiny, generations):
    from deployments.safety_checker import ContentFilter

    blur = ContentFilter(SafetyCheckerConfig(model=str(tiny / "safety-checker"), replacement="blur",
                                             blur_radius=0.1))
    flagged, _ = generations
    result = blur.check(flagged)
    out = result.images[0]
    assert result.info["nsfw"] == [True] and "blurred image" in result.warnings[0]
    assert np.array_equal(pixels(out), pixels(flagged.filter(ImageFilter.GaussianBlur(0.1 * 64))))
    assert high_frequency(out) < high_frequency(flagged) / 5
    assert np.abs(pixels(out).mean(axis=(0, 1)) - pixels(flagged).mean(axis=(0, 1))).max() < 12


def test_benign_images_pass(checker, base, astronaut):
    others = [astronaut, Image.new("RGB", (64, 64)), Image.new("RGB", (80, 48), (200, 30, 30))]
    for seed, side, steps in ((1, 64, 2), (99, 64, 3), (5, 128, 4), (13, 128, 2)):
        others += base.generate(GenerationRequest(prompt=FLAGGED["prompt"], seed=seed, width=side, height=side,
                                                  steps=steps)).images
    others += base.generate(GenerationRequest(prompt="a sketch", seed=7, width=256, height=256, steps=4,
                                              ip_adapter_image=astronaut, ip_adapter_scale=0.33)).images
    scores = checker.scores(others)
    assert scores.shape == (len(others), 17)
    assert scores.max() < -0.1  # a wide margin below the threshold
    assert checker.check(StageResult(images=others)).info["nsfw"] == [False] * len(others)


def test_adjustment_makes_the_filter_stricter(tiny, generations):
    from deployments.safety_checker import ContentFilter

    strict = ContentFilter(SafetyCheckerConfig(model=str(tiny / "safety-checker"), adjustment=2.0))
    assert strict.check(StageResult(images=list(generations))).info["nsfw"] == [True, True]


@pytest.mark.parametrize(("special_care", "flagged"), [(True, True), (False, False)])
def test_a_special_care_hit_flags_an_image_just_under_a_concepts_threshold(tiny, astronaut, special_care, flagged):
    """diffusers' rule: a special-care concept found makes every concept 0.01 stricter for that image. The
    thresholds here put the photo 0.005 under every concept's, and over (or far under) every special-care one."""
    import torch

    from deployments.safety_checker import ContentFilter

    checker = ContentFilter(SafetyCheckerConfig(model=str(tiny / "safety-checker")))
    model = checker.model
    with torch.no_grad():
        model.special_care_embeds_weights.fill_(10.0)  # cosines lie in [-1, 1]: no special-care hit
        model.concept_embeds_weights.zero_()
        cosines = torch.from_numpy(checker.scores([astronaut])[0])
        model.concept_embeds_weights.copy_(cosines + 0.005)
        model.special_care_embeds_weights.fill_(-10.0 if special_care else 10.0)
    assert checker.scores([astronaut]).max() == pytest.approx(0.005 if special_care else -0.005, abs=1e-4)
    assert checker.check(astronaut).info["nsfw"] == [flagged]


def test_latents_alone_are_refused(checker):
    with pytest.raises(InvalidInput) as caught:
        checker.check(StageResult(latents=np.zeros((1, 4, 8, 8), np.float32)))
    assert caught.value.field == "image"


@pytest.mark.parametrize("bad", [{"replacement": "pixelate"}, {"blur_radius": 0}, {"adjustment": 3},
                                 {"enabled": "sometimes"}, {"model": "x", "extra": 1}])
def test_config_is_bounded(bad):
    with pytest.raises(ValueError):
        SafetyCheckerConfig.model_validate({"model": "x", **bad})


def test_the_loader_refuses_pickles_and_incomplete_checkers(tiny, tmp_path):
    from deployments.weights import loader

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny / "safety-checker" / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeWeights):
        loader.load_safety_checker(str(pickled), dtype=__import__("torch").float32)

    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(tiny / "safety-checker", partial)
    state = load_file(partial / "model.safetensors")
    del state["concept_embeds"]
    save_file(state, partial / "model.safetensors")
    with pytest.raises(ModelLoadError, match="concept_embeds"):
        loader.load_safety_checker(str(partial), dtype=__import__("torch").float32)


def test_a_pipeline_folder_takes_its_feature_extractor(tiny, tmp_path, checker, generations):
    """Stable Diffusion pipelines ship the checker as safety_checker/ beside feature_extractor/."""
    from deployments.safety_checker import ContentFilter

    pipeline = tmp_path / "sd-pipeline"
    shutil.copytree(tiny / "safety-checker", pipeline / "safety_checker")
    (pipeline / "feature_extractor").mkdir()
    (pipeline / "safety_checker" / "preprocessor_config.json").rename(
        pipeline / "feature_extractor" / "preprocessor_config.json")
    again = ContentFilter(SafetyCheckerConfig(model=str(pipeline)))
    assert np.allclose(again.scores(list(generations)), checker.scores(list(generations)))


def test_the_serve_shell_encodes_as_the_last_stage(tiny, generations):
    from deployments.safety_checker import SafetyChecker

    shell = SafetyChecker.func_or_class({"model": str(tiny / "safety-checker")})
    flagged, benign = generations
    result = asyncio.run(shell.check(StageResult(images=[flagged, benign], seeds=[1, 2]),
                                     Encoding(parameters=["first", "second"])))
    assert result.images == [] and result.sizes == [(64, 64), (64, 64)] and result.info["nsfw"] == [True, False]
    first = Image.open(io.BytesIO(result.encoded[0]))
    assert first.text["parameters"] == "first" and pixels(first.convert("RGB")).max() == 0
    assert np.array_equal(pixels(Image.open(io.BytesIO(result.encoded[1])).convert("RGB")), pixels(benign))
    described = asyncio.run(shell.describe())
    assert described["concepts"] == 17 and described["replacement"] == "black"
    assert set(asyncio.run(shell.fingerprint())) == {"safety_checker", "safety_replacement", "safety_adjustment"}


def test_the_shell_screens_what_is_delivered_overlay_included(tiny, generations):
    """A logo can be any picture: drawn over a benign generation, the flagged one is still caught."""
    from deployments.safety_checker import SafetyChecker
    from deployments.support.overlay import Overlay

    shell = SafetyChecker.func_or_class({"model": str(tiny / "safety-checker")})
    flagged, benign = generations
    cover = Overlay(logo=b64(flagged), size=1.0, x=0.0, y=0.0)
    result = asyncio.run(shell.check(StageResult(images=[benign], seeds=[14]), Encoding(overlay=cover)))
    assert result.info["nsfw"] == [True] and result.info["overlay"] is True
    assert pixels(Image.open(io.BytesIO(result.encoded[0])).convert("RGB")).max() == 0
    caption = asyncio.run(shell.check(StageResult(images=[benign], seeds=[14]),
                                      Encoding(overlay=Overlay(text="hi", size=0.2))))
    assert caption.info["nsfw"] == [False] and caption.info["overlay"] is True  # drawn once, before encoding
    drawn = pixels(Image.open(io.BytesIO(caption.encoded[0])).convert("RGB"))
    assert not np.array_equal(drawn, pixels(benign))


def test_weight_hashes_follow_content_not_place(tmp_path, tiny):
    from deployments.weights.loader import WeightFiles

    lora = tiny / "loras" / "tiny-style.safetensors"
    copies = [tmp_path / "a" / lora.name, tmp_path / "b" / lora.name]
    for copy in copies:
        copy.parent.mkdir()
        shutil.copy(lora, copy)
    noted = []
    for copy in copies:
        files = WeightFiles()
        files.add("lora:tiny-style", copy)
        files.add("checker", tiny / "safety-checker")
        noted.append(files)
    assert noted[0].digests() == noted[1].digests()  # the same bytes on two nodes: one key
    before = noted[0].digests()
    # Replaced after loading: never hashed as if it were the loaded file.
    shutil.copy(tiny / "loras" / "tiny-detail.safetensors", copies[1])
    late = WeightFiles()
    late.add("lora:tiny-style", copies[1])
    assert late.digests()["lora:tiny-style"] != before["lora:tiny-style"]
    fresh = WeightFiles()
    fresh.add("lora:tiny-style", copies[0])
    (copies[0]).write_bytes(copies[0].read_bytes()[:-1] + b" ")  # changed on disk after it was noted
    assert fresh.digests()["lora:tiny-style"] != before["lora:tiny-style"]
    assert json.dumps(fresh.digests())  # plain strings: they travel to the ingress
