"""Textual-inversion embeddings on the tiny models, through the real loading code: a prompt naming one reads its
vectors (A1111 and native syntax alike, emphasis included), the same pixels every time; a removed one stops applying
after a refresh; the listing has A1111's shape; a wrong-shape file is skipped, a pickle never read."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from deployments.factory.adapters import SDXL_EMBEDDING_WIDTHS, build_embedding, embedding_widths
from deployments.support.embeddings import Vocabulary
from deployments.support.generation import GenerationRequest
from deployments.support.prompts import PromptEncoder, chunk
from tests.helpers import pixels
from tests.test_loader import _Canary

SMALL = dict(width=64, height=64, steps=3, guidance_scale=5.0, seed=11)
NAME = "tiny-concept"
UNKNOWN = "zorblax"  # a plain word of the same shape


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(scope="module")
def generator(tiny, folder):
    from deployments.sdxl_base import BaseGenerator
    from deployments.support.config import SDXLBaseConfig

    made = BaseGenerator(SDXLBaseConfig(model={"source": str(tiny / "sdxl-base")}, embeddings_dir=str(folder)))
    made.before = {syntax: image(made, f"a photo of {NAME}, red", syntax) for syntax in ("plain", "a1111")}
    made.unknown_before = image(made, f"a photo of {UNKNOWN}, red", "a1111")
    build_embedding(folder / f"{NAME}.safetensors", embedding_widths(made.checkpoint().txt2img), vectors=2, seed=60)
    made.refresh()
    return made


def image(generator, prompt: str, syntax: str = "a1111", **kw) -> np.ndarray:
    request = GenerationRequest(**{**SMALL, "prompt": prompt, "prompt_syntax": syntax, **kw})
    return pixels(generator.generate(request).images[0])


def differ(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


@pytest.mark.parametrize("syntax", ["a1111", "plain"])
def test_a_named_embedding_changes_the_image_and_reproduces(generator, syntax):
    named = image(generator, f"a photo of {NAME}, red", syntax)
    assert differ(named, image(generator, f"a photo of {UNKNOWN}, red", syntax)) > 1.0
    assert differ(named, generator.before[syntax]) > 1.0  # the same words before the file was there
    assert np.array_equal(named, image(generator, f"a photo of {NAME}, red", syntax))
    # A1111 matches the name's CLIP tokens: any case, and the negative prompt reads it too.
    assert np.array_equal(named, image(generator, f"a photo of {NAME.upper()}, red", syntax))
    negative = image(generator, "a photo, red", syntax, negative_prompt=NAME)
    assert differ(negative, image(generator, "a photo, red", syntax, negative_prompt=UNKNOWN)) > 1.0


def test_other_prompts_read_as_before(generator):
    assert np.array_equal(image(generator, f"a photo of {UNKNOWN}, red"), generator.unknown_before)


def test_a1111_emphasis_weights_the_embedding(generator):
    plain = image(generator, f"a photo of {NAME}, red")
    assert np.array_equal(image(generator, f"a photo of ({NAME}:1.0), red"), plain)
    weighted = image(generator, f"a photo of ({NAME}:1.2), red")
    assert differ(weighted, plain) > 0.05
    assert differ(weighted, image(generator, f"a photo of ({UNKNOWN}:1.2), red")) > 1.0
    assert np.array_equal(weighted, image(generator, f"a photo of ({NAME}:1.2), red"))


def test_listing_has_a1111s_shape_and_skips_what_does_not_fit(generator, folder):
    wrong = folder / "real-sdxl.safetensors"
    build_embedding(wrong, SDXL_EMBEDDING_WIDTHS, vectors=1, seed=61)  # 768 + 1280: not the tiny encoders'
    canary = folder.parent / "canary"
    (folder / "evil.pt").write_bytes(pickle.dumps(_Canary(canary)))
    (folder / "evil2.safetensors").write_bytes(pickle.dumps(_Canary(canary)))
    try:
        assert generator.refresh()["embeddings"] == ["real-sdxl", NAME]
        image(generator, NAME)  # a batch syncs the checkpoint with the folder
        tiny_widths = sum(embedding_widths(generator.checkpoint().txt2img))
        blank = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
        assert generator.describe()["embeddings"] == {
            "loaded": {NAME: {**blank, "shape": tiny_widths, "vectors": 2}},
            "skipped": {"real-sdxl": {**blank, "shape": 768 + 1280, "vectors": 1}},
        }
        assert not canary.exists()
        assert {"embedding:tiny-concept", "embedding:real-sdxl"} <= set(generator.fingerprint())
    finally:
        for path in (wrong, folder / "evil.pt", folder / "evil2.safetensors"):
            path.unlink()
        generator.refresh()


def test_a_removed_embedding_no_longer_applies_after_refresh(tiny, tmp_path):
    from deployments.sdxl_base import BaseGenerator
    from deployments.support.config import SDXLBaseConfig

    made = BaseGenerator(SDXLBaseConfig(model={"source": str(tiny / "sdxl-base")}, embeddings_dir=str(tmp_path)))
    words = image(made, f"a photo of {NAME}")
    path = tmp_path / f"{NAME}.safetensors"
    build_embedding(path, embedding_widths(made.checkpoint().txt2img), vectors=3, seed=62)
    assert made.refresh()["embeddings"] == [NAME]
    assert differ(image(made, f"a photo of {NAME}"), words) > 1.0
    path.unlink()
    assert made.refresh()["embeddings"] == []
    assert np.array_equal(image(made, f"a photo of {NAME}"), words)
    assert np.array_equal(image(made, f"a photo of {NAME}", "plain"), image(made, f"a photo of {NAME}", "plain"))
    assert made.describe()["embeddings"] == {"loaded": {}, "skipped": {}}


def test_names_match_as_whole_words_any_case():
    vocabulary = Vocabulary({"bad-hands": ("<a>", "<b>"), "bad": ("<c>",), "Style 2": ("<d>",)})
    assert vocabulary.rewrite("BAD-HANDS, bad.").split() == ["<a>", "<b>", ",", "<c>", "."]
    assert vocabulary.rewrite("badly xbad bad2") == "badly xbad  <c> 2"  # CLIP splits digits off: so does A1111
    assert vocabulary.rewrite("bad-handsome").split() == ["<c>", "-handsome"]
    assert vocabulary.rewrite("(bad:1.2) style   2").split() == ["(", "<c>", ":1.2)", "<d>"]
    assert Vocabulary().rewrite("bad") == "bad"


def test_an_embedding_is_kept_whole_in_one_chunk():
    # 74 words then a 3-vector embedding: A1111 starts the next chunk with it rather than cut it in two.
    pieces = [([1] * 74, 1.0), ([7, 8, 9], 1.2)]
    kept = chunk(pieces, comma=None, groups={7: 3})
    assert [len(c.tokens) for c in kept] == [74, 3] and kept[1].weights == [1.2] * 3
    assert [len(c.tokens) for c in chunk(pieces, comma=None)] == [75, 2]


def test_chunk_counts_include_every_vector(generator):
    pipes = generator.checkpoint()
    generator.sync_embeddings(pipes)  # what each batch does first
    tokenizer = pipes.txt2img.tokenizer
    encoder = PromptEncoder(pipes.txt2img, pipes.inversions.vocabulary)
    filler = "a " * 74
    assert encoder.count(f"{filler} a", 4) == 1
    # Its two vectors do not fit the one position left: the embedding moves whole to the next chunk.
    assert [len(c.tokens) for c in encoder.chunks(f"{filler} {NAME}", tokenizer, 4)] == [74, 2]
    assert encoder.count(f"{filler} {NAME}", 4) == 2


def test_the_refiner_takes_the_clip_g_vectors(tiny, folder, generator):
    from deployments.sdxl_refiner import Refiner
    from deployments.support.config import SDXLRefinerConfig
    from deployments.support.generation import RefineRequest, StageResult

    refiner = Refiner(SDXLRefinerConfig(model={"source": str(tiny / "sdxl-refiner")}, embeddings_dir=str(folder)))
    assert set(refiner.inversions.loaded) == {NAME} and refiner.inversions.widths == {"clip_g": 48}
    source = StageResult(images=[generator.checkpoint().txt2img.image_processor.numpy_to_pil(
        np.full((1, 64, 64, 3), 0.5))[0]], seeds=[3])

    def refined(prompt: str, syntax: str) -> np.ndarray:
        request = RefineRequest(prompt=prompt, steps=4, strength=0.5, prompt_syntax=syntax)
        return pixels(refiner.refine_images(request, source).images[0])

    for syntax in ("a1111", "plain"):
        named = refined(f"a photo of {NAME}", syntax)
        assert differ(named, refined(f"a photo of {UNKNOWN}", syntax)) > 0.5
        assert np.array_equal(named, refined(f"a photo of {NAME}", syntax))
