"""Recommendation: log formats, ranking metrics in closed form, SASRec masks, both models beat popularity."""

import json
import math
import urllib.request
from pathlib import Path

import pytest
import torch

from lmforge.apps.recommend import (
    PAD,
    RecommendConfig,
    Recommender,
    SASRec,
    build_app,
    rank_metrics,
    read_interactions,
    synthetic_interactions,
    train_recommender,
    write_interactions,
)
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig

from ..serve.test_serve import LiveServer


def test_csv_logs_are_ordered_by_time_and_short_users_dropped(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("user,item,timestamp\na,x,3\na,y,1\na,z,2\nb,x,1\nb,y,2\n")
    data = read_interactions(log)
    assert data.user_ids == ["a"] and data.item_ids == ["x", "y", "z"]
    assert data.sequences == [[2, 3, 1]]  # y (t=1), z (t=2), x (t=3)


def test_movielens_formats_read_alike(tmp_path):
    rows = [("1", "10", "4", "100"), ("1", "20", "5", "50"), ("1", "30", "3", "75")]
    (tmp_path / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(",".join(r) + "\n" for r in rows)
    )
    (tmp_path / "ratings.dat").write_text("".join("::".join(r) + "\n" for r in rows))
    (tmp_path / "u.data").write_text("".join("\t".join(r) + "\n" for r in rows))
    results = [read_interactions(tmp_path / name) for name in ("ratings.csv", "ratings.dat", "u.data")]
    for data in results:
        assert data.item_ids == ["10", "20", "30"] and data.sequences == [[2, 3, 1]]


@pytest.mark.parametrize(
    "content, message",
    [
        ("person,item,timestamp\n", "no user column"),
        ("user,item,timestamp\na,x,1\na,y,soon\n", r"log.csv:3: timestamp 'soon' is not a number"),
        ("user,item,timestamp\na,x,1\n", "no user has 3 or more interactions"),
    ],
)
def test_bad_logs_are_named(tmp_path, content, message):
    (tmp_path / "log.csv").write_text(content)
    with pytest.raises(LmforgeError, match=message):
        read_interactions(tmp_path / "log.csv")


def test_synthetic_users_stay_in_one_item_group():
    rows = synthetic_interactions(users=50, items=60, clusters=3, seed=1)
    groups = {}
    for user, item, _ in rows:
        groups.setdefault(user, set()).add(int(item[1:]) // 20)
    assert len(groups) == 50 and all(len(g) == 1 for g in groups.values())


def test_rank_metrics_closed_form():
    scores = torch.tensor([[-math.inf, 5.0, 4.0, 3.0, 2.0, 1.0] + [0.0] * 10])
    # Target item 3 has two better items (1, 2); item 1 is in the history, so only item 2 outranks it: rank 1.
    result = rank_metrics(scores, [[1]], [3], negatives=0)
    assert result == {"hr@10": 1.0, "ndcg@10": pytest.approx(1 / math.log2(3))}
    # Target item 15 (score 0) ranks behind items 2..14 but ties with 10 others: rank 4 (2, 3, 4, 5 beat it).
    assert rank_metrics(scores, [[1]], [15], negatives=0)["ndcg@10"] == pytest.approx(1 / math.log2(6))


def test_sasrec_is_causal_and_never_recommends_padding():
    torch.manual_seed(0)
    model = SASRec(ModelConfig(vocab_size=21, block_size=8, n_layers=1, n_heads=2, d_model=16)).eval()
    history = torch.tensor([[3, 5, 7, 9, PAD, PAD]])
    changed = history.clone()
    changed[0, 3] = 11
    with torch.no_grad():
        a, b = model(history), model(changed)
    assert torch.allclose(a[0, :3], b[0, :3]) and not torch.allclose(a[0, 3], b[0, 3])
    assert torch.isinf(a[..., PAD]).all()
    assert torch.allclose(model.scores(history)[0], a[0, 3])  # the last real position


@pytest.fixture(scope="module")
def synthetic_log(tmp_path_factory):
    rows = synthetic_interactions(users=240, items=240, clusters=4, seed=0)
    return write_interactions(rows, tmp_path_factory.mktemp("log") / "log.csv")


def test_both_models_beat_popularity_by_a_margin(synthetic_log, tmp_path):
    common = dict(data=str(synthetic_log), d_model=32, n_layers=1, epochs=15, batch_size=64)
    sasrec = train_recommender(RecommendConfig(out=str(tmp_path / "s"), model="sasrec", **common), verbose=0)
    mf = train_recommender(RecommendConfig(out=str(tmp_path / "m"), model="mf", **common), verbose=0)
    popularity = sasrec["popularity_full"]["hr@10"]
    assert popularity < 0.15  # flat item popularity: ~10 of 240 items
    # The groups are learnable by both (measured: MF 0.61-0.65, SASRec 0.85-0.86, popularity 0.05 over 3 seeds);
    # the steps inside a group only by the sequence model.
    assert mf["full"]["hr@10"] >= popularity + 0.3
    assert sasrec["full"]["hr@10"] >= popularity + 0.6 and sasrec["full"]["hr@10"] >= mf["full"]["hr@10"] + 0.1
    assert sasrec["sampled"]["hr@10"] >= sasrec["popularity_sampled"]["hr@10"] + 0.3


def test_train_eval_top_and_serve_from_the_cli(synthetic_log, tmp_path, capsys, monkeypatch):
    out = tmp_path / "rec"
    args = ["recommend", "train", "--data", str(synthetic_log), "--out", str(out), "--epochs=8", "--d_model=32"]
    assert main([*args, "--n_layers=1"]) == 0
    assert "popularity HR@10" in capsys.readouterr().out
    assert main(["recommend", "eval", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].startswith("full") and table[2].startswith("sampled")
    assert main(["recommend", "top", str(out), "--history", "i0,i1,i2", "-k", "3"]) == 0
    top = json.loads(capsys.readouterr().out)
    assert len(top) == 3 and not {"i0", "i1", "i2"} & {row["item"] for row in top}

    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.append(options))
    assert main(["recommend", "serve", str(out), "--port", "8123"]) == 0
    assert started == [{"host": "127.0.0.1", "port": 8123, "log_level": "warning"}]
    # uvicorn logs only warnings: without these lines, start-up is silent until the first request
    assert capsys.readouterr().err.splitlines() == [
        f"loading {out} ...",
        f"serving {out} on http://127.0.0.1:8123 (POST /v1/recommend)",
    ]

    recommender = Recommender(out)
    server = LiveServer(build_app(recommender))
    try:
        url = f"http://127.0.0.1:{server.port}/v1/recommend"

        def post(body):
            request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read())

        status, body = post({"history": ["i0", "i1", "i2"], "k": 3})
        assert status == 200 and [row["item"] for row in body["items"]] == [row["item"] for row in top]
        status, body = post({"history": ["no-such-item"]})
        assert status == 400 and "unknown items" in body["error"]["message"]
        status, _ = post({"history": ["i0"], "k": 0})
        assert status == 422
        status, body = post({"user": recommender.user_ids[0], "k": 2})
        assert status == 200 and len(body["items"]) == 2
    finally:
        server.stop()


def movielens_recommender(tmp_path) -> Path:
    """A one-epoch SASRec on a MovieLens-style log: 20 users, items 1-12 (numbers, as MovieLens's ids)."""
    log = tmp_path / "ratings.csv"
    rows = [f"{user},{(user + step) % 12 + 1},{step}" for user in range(20) for step in range(5)]
    log.write_text("userId,movieId,timestamp\n" + "\n".join(rows) + "\n")
    out = tmp_path / "rec"
    train_recommender(
        RecommendConfig(data=str(log), out=str(out), d_model=16, n_layers=1, epochs=1, batch_size=8), verbose=0
    )
    return out


def test_the_server_takes_item_and_user_ids_as_numbers_too(tmp_path):
    """MovieLens ids are numbers; a client sends them as JSON numbers. Strings still work; floats are no ids."""
    from fastapi.testclient import TestClient

    with TestClient(build_app(Recommender(movielens_recommender(tmp_path)))) as http:
        numbers = http.post("/v1/recommend", json={"history": [1, 2, 3], "k": 3})
        assert numbers.status_code == 200, numbers.text
        strings = http.post("/v1/recommend", json={"history": ["1", "2", "3"], "k": 3}).json()
        assert numbers.json() == strings and len(strings["items"]) == 3
        assert http.post("/v1/recommend", json={"user": 4, "k": 2}).status_code == 200
        assert http.post("/v1/recommend", json={"history": [1.5]}).status_code == 422


def test_the_server_answers_errors_in_the_openai_shape_of_lmforge_serve(tmp_path):
    """The recommender's errors are lmforge serve's: {"error": {message, type, param, code}}."""
    from fastapi.testclient import TestClient

    with TestClient(build_app(Recommender(movielens_recommender(tmp_path)))) as http:
        unknown_item = http.post("/v1/recommend", json={"history": [1, 99]})
        assert unknown_item.status_code == 400
        assert unknown_item.json() == {
            "error": {
                "message": "unknown items ['99']",
                "type": "invalid_request_error",
                "param": "history",
                "code": None,
            }
        }
        unknown_user = http.post("/v1/recommend", json={"user": "nobody"})
        assert (unknown_user.status_code, unknown_user.json()["error"]["param"]) == (400, "user")
        invalid = http.post("/v1/recommend", json={"history": [1], "k": 0})
        assert invalid.status_code == 422
        assert invalid.json()["error"]["param"] == "k" and invalid.json()["error"]["type"] == "invalid_request_error"
        assert "greater than or equal to 1" in invalid.json()["error"]["message"]
        missing = http.get("/v1/no-such-route")
        assert (missing.status_code, missing.json()) == (
            404,
            {"error": {"message": "Not Found", "type": "invalid_request_error", "param": None, "code": "not_found"}},
        )
