"""Semantic search: embed text passages, keep them in a nearest-neighbour index, query it.

Vectors are unit length (`SentenceEmbedder`), so cosine similarity is a dot product. The
index is exact (one matrix product over all passages, numpy); with `faiss` installed and
`use_faiss=True` the same search runs through an exact FAISS inner-product index. Saved as a
folder: vectors.npy plus passages.json (text, source file, position).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lmforge.atomic import write_files_atomically
from lmforge.errors import LmforgeError, missing_extra

TEXT_SUFFIXES = (".txt", ".md", ".rst")


@dataclass
class Passage:
    text: str
    source: str
    start: int  # character offset in the source


@dataclass
class Hit:
    score: float  # cosine similarity
    passage: Passage


def split_passages(text: str, source: str, max_chars: int = 800) -> list[Passage]:
    """Paragraphs (blank-line separated), merged while short and cut when longer than max_chars."""
    passages, current, current_start, offset = [], "", 0, 0
    for paragraph in text.split("\n\n"):
        start = text.find(paragraph, offset)
        offset = start + len(paragraph)
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        if current and len(current) + len(paragraph) + 2 > max_chars:
            passages.append(Passage(current, source, current_start))
            current = ""
        if not current:
            current_start = start
        current = f"{current}\n\n{paragraph}" if current else paragraph
        while len(current) > max_chars:
            passages.append(Passage(current[:max_chars], source, current_start))
            current, current_start = current[max_chars:], current_start + max_chars
    if current:
        passages.append(Passage(current, source, current_start))
    return passages


class VectorIndex:
    """Passages and their unit vectors; `search` returns the k most similar to a query."""

    def __init__(self, vectors: np.ndarray, passages: list[Passage], use_faiss: bool = False):
        if len(vectors) != len(passages):
            raise ValueError(f"{len(vectors)} vectors for {len(passages)} passages")
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.passages = passages
        self.faiss_index = None
        if use_faiss:
            try:
                import faiss
            except ImportError:
                raise missing_extra("use_faiss=True", "faiss-cpu", "faiss") from None
            self.faiss_index = faiss.IndexFlatIP(self.vectors.shape[1])
            self.faiss_index.add(self.vectors)

    def search(self, query_vectors: np.ndarray, k: int = 5) -> list[list[Hit]]:
        """Top-k passages for each query vector (Q, d), best first."""
        queries = np.ascontiguousarray(np.atleast_2d(query_vectors), dtype=np.float32)
        k = min(k, len(self.passages))
        if self.faiss_index is not None:
            scores, indices = self.faiss_index.search(queries, k)
        else:
            similarity = queries @ self.vectors.T
            indices = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
            scores = np.take_along_axis(similarity, indices, axis=1)
        return [
            [Hit(float(score), self.passages[int(index)]) for score, index in zip(row_scores, row_indices)]
            for row_scores, row_indices in zip(scores, indices)
        ]

    def save(self, folder: str | Path) -> Path:
        """vectors.npy + passages.json in `folder`, replaced atomically."""

        def write_vectors(path: Path) -> None:
            with path.open("wb") as handle:  # np.save given a path would append ".npy" to the temporary name
                np.save(handle, self.vectors)

        passages = json.dumps([asdict(p) for p in self.passages], ensure_ascii=False)
        return write_files_atomically(
            folder, {"vectors.npy": write_vectors, "passages.json": lambda path: path.write_text(passages)}
        )

    @classmethod
    def load(cls, folder: str | Path, use_faiss: bool = False) -> VectorIndex:
        folder = Path(folder)
        try:
            vectors = np.load(folder / "vectors.npy", allow_pickle=False)
            passages = [Passage(**p) for p in json.loads((folder / "passages.json").read_text())]
        except (OSError, ValueError, TypeError) as error:
            raise LmforgeError(f"{folder}: not a readable search index ({error})") from None
        return cls(vectors, passages, use_faiss)


def index_folder(folder: str | Path, embedder, max_chars: int = 800, use_faiss: bool = False) -> VectorIndex:
    """Embed every .txt/.md/.rst file under `folder`, passage by passage."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise LmforgeError(f"{folder}: no {'/'.join(TEXT_SUFFIXES)} files to index")
    passages = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise LmforgeError(f"{path}: not UTF-8 text (byte {error.start})") from None
        passages += split_passages(text, str(path.relative_to(folder)), max_chars)
    vectors = embedder.embed([p.text for p in passages]).numpy()
    return VectorIndex(vectors, passages, use_faiss)
