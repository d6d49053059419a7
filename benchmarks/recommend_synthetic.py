"""Sequential recommendation on the synthetic log: SASRec vs matrix factorisation vs popularity.

600 users, 600 items in 6 groups; each user stays in one group and mostly steps to its next
item (`lmforge.apps.recommend.synthetic_interactions`). Leave-one-out: each user's last item is the
test, the one before is trained on as the validation item. Prints HR@10 and NDCG@10 with full
ranking (all unseen items) and sampled ranking (100 unseen negatives), and training time, and
writes benchmarks/results/recommend_synthetic.json. A MovieLens ratings file works the same way:

    python benchmarks/recommend_synthetic.py [--data ml-1m/ratings.dat] [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lmforge.apps.recommend import RecommendConfig, train_recommender

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        for kind in ("sasrec", "mf"):
            started = time.perf_counter()
            config = RecommendConfig(data=args.data, out=f"{scratch}/{kind}", model=kind, epochs=args.epochs)
            result = train_recommender(config, verbose=0)
            result["seconds"] = round(time.perf_counter() - started, 1)
            results[kind] = result
            rows.append((kind, result["full"], result["sampled"], result["seconds"]))
    popularity = results["sasrec"]
    rows.append(("popularity", popularity["popularity_full"], popularity["popularity_sampled"], 0.0))
    print(f"{'model':<12}{'full HR@10':>12}{'NDCG@10':>10}{'sampled HR@10':>15}{'NDCG@10':>10}{'train s':>9}")
    for name, full, sampled, seconds in rows:
        print(
            f"{name:<12}{full['hr@10']:>12.4f}{full['ndcg@10']:>10.4f}"
            f"{sampled['hr@10']:>15.4f}{sampled['ndcg@10']:>10.4f}{seconds:>9.1f}"
        )
    RESULTS.mkdir(exist_ok=True)
    summary = {name: {"full": full, "sampled": sampled, "seconds": s} for name, full, sampled, s in rows}
    summary["data"] = {"source": args.data, "users": results["sasrec"]["users"], "items": results["sasrec"]["items"]}
    (RESULTS / "recommend_synthetic.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
