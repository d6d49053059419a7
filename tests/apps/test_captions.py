"""Digit captions: every phrasing names the digit, held-out phrasings never occur in training."""

import re

import pytest

from lmforge.apps.captions import (
    DIGIT_WORDS,
    HELD_OUT_PHRASINGS,
    TRAINING_PHRASINGS,
    all_digit_captions,
    digit_caption,
    digit_captions,
)


def test_each_caption_names_its_digit():
    for label, caption in all_digit_captions(TRAINING_PHRASINGS + HELD_OUT_PHRASINGS):
        words = re.findall(r"\w+", caption)
        assert DIGIT_WORDS[label] in words or str(label) in words
    assert digit_caption(7, "a handwritten {word}") == "a handwritten seven"
    assert digit_caption(7, "the digit {digit}") == "the digit 7"


def test_held_out_phrasings_are_unseen_and_draws_are_seeded():
    training = {caption for _, caption in all_digit_captions(TRAINING_PHRASINGS)}
    held_out = {caption for _, caption in all_digit_captions(HELD_OUT_PHRASINGS)}
    assert not training & held_out
    labels = [3, 1, 4, 1, 5, 9, 2, 6]
    assert digit_captions(labels, seed=1) == digit_captions(labels, seed=1)
    assert len(set(digit_captions([7] * 50, seed=0))) > 3  # several phrasings are drawn
    with pytest.raises(ValueError, match="outside 0-9"):
        digit_caption(10, "{word}")
