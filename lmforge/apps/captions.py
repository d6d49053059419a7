"""Captions for scikit-learn's digits, in several phrasings, for the text-conditioned image models.

Text-to-image and image-text models need captioned images; the digits ship with labels only. Each
image gets a caption written from its label in one of several phrasings. The held-out phrasings are
never seen in training, so a model asked "the numeral seven in handwriting" shows whether it
learned the digit from the sentence's meaning (through the sentence embedding) or memorised strings.
"""

from __future__ import annotations

import random

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {word} is the digit's English name, {digit} its numeral.
TRAINING_PHRASINGS = (
    "a handwritten {word}",
    "the digit {digit}",
    "number {word}, written by hand",
    "an image of the number {digit}",
    "a picture of a handwritten {digit}",
    "{word}",
    "the handwritten digit {word}",
    "a {digit} written by hand",
)
HELD_OUT_PHRASINGS = (
    "a drawing of the digit {word}",
    "someone wrote the number {digit}",
    "the numeral {word} in handwriting",
)


def digit_caption(label: int, phrasing: str) -> str:
    """One caption for digit `label` (0-9) in `phrasing` (a format string with {word} and/or {digit})."""
    if not 0 <= label <= 9:
        raise ValueError(f"digit label {label} is outside 0-9")
    return phrasing.format(word=DIGIT_WORDS[label], digit=label)


def digit_captions(labels, phrasings: tuple[str, ...] = TRAINING_PHRASINGS, seed: int = 0) -> list[str]:
    """A caption per label, each in a phrasing drawn at random (seeded) from `phrasings`."""
    rng = random.Random(seed)
    return [digit_caption(int(label), rng.choice(phrasings)) for label in labels]


def all_digit_captions(phrasings: tuple[str, ...] = TRAINING_PHRASINGS) -> list[tuple[int, str]]:
    """(label, caption) for every digit in every phrasing, labels in order."""
    return [(label, digit_caption(label, phrasing)) for label in range(10) for phrasing in phrasings]
