import random

import pytest
import torch

from lmforge.data import prepare

WORDS = (
    "the king my lord good sweet love night day honour blood crown heart speak fair death "
    "what shall thou thee thy hath doth come go"
).split()


def make_corpus(lines: int = 400, seed: int = 0) -> str:
    """Deterministic play-like text with enough structure for a tiny model to learn."""
    rng = random.Random(seed)
    out = []
    for index in range(lines):
        speaker = rng.choice(["ROMEO", "JULIET", "KING", "NURSE"])
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))
        out.append(f"{speaker}.\n{words.capitalize()}.\n" if index % 3 else f"\n{speaker}.\n{words}!\n")
    return "".join(out)


@pytest.fixture(autouse=True)
def _fixed_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(make_corpus(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def char_dataset(tmp_path_factory, corpus_file):
    out = tmp_path_factory.mktemp("data_char")
    prepare([corpus_file], out, tokenizer="char", val_fraction=0.1)
    return out
