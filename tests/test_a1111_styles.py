"""A1111's saved prompt styles: the styles file as A1111 reads it, merged into prompts as A1111 merges them, and read
again when the operator edits it."""

from __future__ import annotations

import os

import pytest

from deployments.support.errors import InvalidInput
from graphs.api.a1111_styles import MAX_STYLES_PER_REQUEST, PromptStyles, merge, parse

CSV = ('name,prompt,negative_prompt\n'
       'cinematic,"cinematic still of {prompt}, film grain","cartoon"\n'
       'detail,"highly detailed",\n')


def test_a_style_takes_the_prompt_in_place_of_its_placeholder_else_after_a_comma():
    assert merge("cinematic still of {prompt}, film grain", "a fox") == "cinematic still of a fox, film grain"
    assert merge("highly detailed", "a fox ") == "a fox, highly detailed"
    assert merge("highly detailed", "") == "highly detailed"
    assert merge("", "a fox") == "a fox"


def test_the_file_is_read_as_a1111_reads_it():
    styles = parse(CSV)
    assert list(styles) == ["cinematic", "detail"]
    assert styles["detail"].negative_prompt == ""
    old = parse("name, text\nsketch, pencil sketch\n")  # A1111's old two-column files
    assert old["sketch"].prompt == "pencil sketch"
    with pytest.raises(ValueError, match="name and a prompt column"):
        parse("title,words\nx,y\n")


def test_named_styles_apply_in_order_to_both_prompts_and_an_unknown_one_is_named(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text("\ufeff" + CSV, encoding="utf-8")  # as a spreadsheet program saves it
    styles = PromptStyles(path)
    prompt, negative, warnings = styles.apply("a fox", "", ["cinematic", "nope", "detail"])
    assert prompt == "cinematic still of a fox, film grain, highly detailed"
    assert negative == "cartoon"
    assert warnings == ["styles: no style is named 'nope' (GET /sdapi/v1/prompt-styles); it was not applied"]
    assert styles.listing()[0] == {"name": "cinematic", "prompt": "cinematic still of {prompt}, film grain",
                                   "negative_prompt": "cartoon"}
    with pytest.raises(InvalidInput) as refused:
        styles.apply("a fox", "", ["detail"] * (MAX_STYLES_PER_REQUEST + 1))
    assert refused.value.field == "styles"


def test_an_edit_is_read_again_and_one_that_does_not_parse_keeps_the_styles_before(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text(CSV)
    styles = PromptStyles(path)
    assert [s["name"] for s in styles.listing()] == ["cinematic", "detail"]
    path.write_text(CSV + "sketch,pencil sketch,\n")
    os.utime(path, ns=(1, 1))  # a new modification time, however fast the edit came
    assert [s["name"] for s in styles.listing()] == ["cinematic", "detail", "sketch"]
    path.write_text("no columns here\n")
    os.utime(path, ns=(2, 2))
    assert [s["name"] for s in styles.listing()] == ["cinematic", "detail", "sketch"]
    path.unlink()
    assert styles.listing() == []
    assert PromptStyles(None).apply("a fox", "", ["cinematic"])[0] == "a fox"
