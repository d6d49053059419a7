"""Semantic search over a folder of text files with the shipped all-MiniLM-L6-v2 encoder.

    python examples/semantic_search.py FOLDER "your question" ["another question" ...]

Without arguments it indexes the Shakespeare plays (fetched once by the `shakespeare` recipe)
and asks a few questions. The same from the command line: `lmforge search FOLDER "question"`.
"""

import sys
import tempfile
from pathlib import Path

from lmforge.encoder import SentenceEmbedder
from lmforge.search import index_folder


def main() -> None:
    if len(sys.argv) >= 3:
        folder, queries = Path(sys.argv[1]), sys.argv[2:]
    else:
        from lmforge.recipes import shakespeare_corpus

        folder = Path(tempfile.mkdtemp())
        (folder / "shakespeare.txt").write_text(shakespeare_corpus().read_text(encoding="utf-8")[:200_000])
        queries = ["a ghost appears on the castle walls", "two young lovers from feuding families", "a storm at sea"]
    embedder = SentenceEmbedder()
    index = index_folder(folder, embedder, max_chars=600)
    print(f"indexed {len(index.passages)} passages from {folder}")
    for query, hits in zip(queries, index.search(embedder.embed(queries).numpy(), k=3)):
        print(f"\n> {query}")
        for hit in hits:
            snippet = " ".join(hit.passage.text.split())[:120]
            print(f"  {hit.score:.3f}  {hit.passage.source}@{hit.passage.start}: {snippet}")


if __name__ == "__main__":
    main()
