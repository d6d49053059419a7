"""Semantic search: passage splitting, exact top-k, save/load, and the CLI on a small folder."""

import subprocess
import sys

import numpy as np
import pytest

from lmforge.apps.search import Passage, VectorIndex, index_folder, split_passages
from lmforge.errors import LmforgeError


def test_passages_cover_the_text_and_respect_the_limit():
    text = "First paragraph here.\n\nSecond one.\n\n" + "x" * 250 + "\n\nLast."
    passages = split_passages(text, "doc.txt", max_chars=100)
    assert all(len(p.text) <= 100 for p in passages)
    assert passages[0].text.startswith("First paragraph") and passages[0].start == 0
    assert "".join(p.text for p in passages).replace("\n", "").count("x") == 250
    assert passages[-1].text.endswith("Last.")


def test_exact_search_matches_brute_force_and_survives_save_and_load(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = VectorIndex(vectors, [Passage(f"p{i}", "s", i) for i in range(50)])
    query = rng.normal(size=16).astype(np.float32)
    hits = index.search(query, k=5)[0]
    expected = np.argsort(-(vectors @ query))[:5]
    assert [hit.passage.text for hit in hits] == [f"p{i}" for i in expected]
    assert hits[0].score >= hits[-1].score
    loaded = VectorIndex.load(index.save(tmp_path / "index"))
    assert [h.passage for h in loaded.search(query, k=5)[0]] == [h.passage for h in hits]


def test_index_folder_finds_the_relevant_document(tmp_path):
    from lmforge.apps.encoder import SentenceEmbedder

    try:
        embedder = SentenceEmbedder()
    except LmforgeError as error:
        pytest.skip(str(error))
    (tmp_path / "cats.txt").write_text("Cats purr and sleep in the sun for most of the day.")
    (tmp_path / "money.md").write_text("Interest rates rose and the stock market fell.")
    (tmp_path / "plants.txt").write_text("Photosynthesis turns sunlight into chemical energy in leaves.")
    index = index_folder(tmp_path, embedder)
    hits = index.search(embedder.embed(["my kitten naps all afternoon"]).numpy(), k=3)[0]
    assert hits[0].passage.source == "cats.txt"
    result = subprocess.run(
        [sys.executable, "-m", "lmforge", "search", str(tmp_path), "how do leaves make energy", "-k", "1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "plants.txt" in result.stdout


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(LmforgeError, match="no .txt/.md/.rst files"):
        index_folder(tmp_path, embedder=None)
