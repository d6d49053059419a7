"""Optional features whose package the default install leaves out say which extra brings it."""

import importlib
import sys

import numpy as np
import pytest

from lmforge.errors import LmforgeError


@pytest.fixture
def without(monkeypatch):
    """Make `import NAME` fail as it does where the package is not installed."""

    def hide(*names: str) -> None:
        for name in names:
            monkeypatch.setitem(sys.modules, name, None)

    return hide


def test_digits_name_the_vision_extra(without):
    from lmforge.apps.vision import load_digits_split

    without("sklearn", "sklearn.datasets", "sklearn.model_selection")
    with pytest.raises(LmforgeError, match=r"scikit-learn .* pip install 'lmforge\[vision\]'"):
        load_digits_split()


def test_parquet_names_the_parquet_extra(without, tmp_path):
    from lmforge.training.data import read_records

    path = tmp_path / "reviews.parquet"
    path.write_bytes(b"PAR1")
    without("pyarrow", "pyarrow.parquet")
    with pytest.raises(LmforgeError, match=r"reviews.parquet: reading Parquet needs the pyarrow .*lmforge\[parquet\]"):
        list(read_records(path))


def test_faiss_names_the_faiss_extra(without):
    from lmforge.apps.search import Passage, VectorIndex

    without("faiss")
    with pytest.raises(LmforgeError, match=r"faiss-cpu .*lmforge\[faiss\]"):
        VectorIndex(np.ones((1, 4), dtype=np.float32), [Passage("a", "a.txt", 0)], use_faiss=True)


def test_lm_eval_adapter_names_the_eval_extra(without, monkeypatch):
    monkeypatch.delitem(sys.modules, "lmforge.evaluation.lm_eval_adapter", raising=False)
    without("lm_eval", "lm_eval.api", "lm_eval.api.model", "lm_eval.api.registry")
    with pytest.raises(LmforgeError, match=r"lm_eval .*lmforge\[eval\]"):
        importlib.import_module("lmforge.evaluation.lm_eval_adapter")
