"""Sequential recommendation: a SASRec-style causal Transformer over item histories, matrix factorisation,
a popularity baseline, and leave-one-out evaluation (HR@10, NDCG@10; sampled and full ranking).

SASRec (Kang & McAuley 2018) is a GPT over item ids: the core `Transformer` with tied item
embeddings, trained to predict each next item with a full softmax. Interaction logs are CSV
(`user,item,timestamp[,rating]`) or MovieLens files (`ratings.csv`, `ratings.dat`, `u.data`).
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import torch
from pydantic import AfterValidator, BaseModel, Field, StrictInt
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer
from lmforge.settings import RecommendConfig
from lmforge.training.fit import Fittable, WarmupCosine

PAD = 0  # item index 0 pads histories; real items are 1..n_items
USER_COLUMNS = ("user", "user_id", "userId", "userid")
ITEM_COLUMNS = ("item", "item_id", "movieId", "movie_id", "itemId", "itemid")
TIME_COLUMNS = ("timestamp", "time", "ts")


@dataclass
class Interactions:
    """Each user's items in time order, as indices 1..n_items; `item_ids[i - 1]` is index i's id in the file."""

    sequences: list[list[int]]
    user_ids: list[str]
    item_ids: list[str]

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


def _movielens_rows(path: Path):
    separator = "::" if path.suffix == ".dat" else "\t"
    with path.open(encoding="latin-1") as handle:  # MovieLens 1M/100k files are Latin-1
        for line_number, line in enumerate(handle, 1):
            fields = line.rstrip("\n").split(separator)
            if len(fields) < 4:
                raise LmforgeError(
                    f"{path}:{line_number}: expected user{separator}item{separator}rating{separator}time"
                )
            yield line_number, {"user": fields[0], "item": fields[1], "rating": fields[2], "timestamp": fields[3]}


def _csv_rows(path: Path):
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        names = {}
        for role, options in (("user", USER_COLUMNS), ("item", ITEM_COLUMNS), ("timestamp", TIME_COLUMNS)):
            found = next((c for c in options if c in columns), None)
            if found is None:
                raise LmforgeError(f"{path}: no {role} column (looked for {', '.join(options)}; header {columns})")
            names[role] = found
        for record in reader:
            yield reader.line_num, {role: record[column] for role, column in names.items()}


def read_interactions(path: str | Path, min_items: int = 3) -> Interactions:
    """Interactions from CSV (`user,item,timestamp`, MovieLens's `userId,movieId,rating,timestamp` too) or
    MovieLens `ratings.dat` / `u.data`; users with fewer than `min_items` are dropped (nothing to hold out)."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path}: no such file")
    rows = _movielens_rows(path) if path.suffix == ".dat" or path.name == "u.data" else _csv_rows(path)
    events: dict[str, list[tuple[float, int, str]]] = {}
    for line_number, row in rows:
        try:
            timestamp = float(row["timestamp"])
        except ValueError:
            raise LmforgeError(f"{path}:{line_number}: timestamp {row['timestamp']!r} is not a number") from None
        events.setdefault(row["user"], []).append((timestamp, line_number, row["item"]))
    kept = {user: sorted(history) for user, history in events.items() if len(history) >= min_items}
    if not kept:
        raise LmforgeError(f"{path}: no user has {min_items} or more interactions")
    item_ids = sorted({item for history in kept.values() for _, _, item in history})
    index = {item: i + 1 for i, item in enumerate(item_ids)}
    users = sorted(kept)
    return Interactions([[index[item] for _, _, item in kept[user]] for user in users], users, item_ids)


def synthetic_interactions(
    users: int = 600, items: int = 600, clusters: int = 6, p_next: float = 0.8, seed: int = 0
) -> list[tuple[str, str, int]]:
    """(user, item, timestamp) rows with known structure: items fall in `clusters` groups; each user stays in
    one group and mostly (p_next) steps to the group's next item, else jumps within the group. A sequence
    model can learn the steps, a user-item model the groups; item popularity is flat, so popularity cannot."""
    rng = random.Random(seed)
    size = items // clusters
    rows = []
    for user in range(users):
        cluster = rng.randrange(clusters)
        position = rng.randrange(size)
        for step in range(rng.randint(10, 25)):
            rows.append((f"u{user}", f"i{cluster * size + position}", step))
            position = (position + 1) % size if rng.random() < p_next else rng.randrange(size)
    return rows


def write_interactions(rows: list[tuple[str, str, int]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user", "item", "timestamp"])
        writer.writerows(rows)
    return path


# --- models ------------------------------------------------------------------------------


class SASRec(Fittable, nn.Module):
    """Item histories (B, T), right-padded with 0 → next-item logits (B, T, n_items + 1) from the core Transformer."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)

    def forward(self, histories: torch.Tensor) -> torch.Tensor:
        logits, _ = self.transformer(histories)
        return logits.masked_fill(_pad_column(logits), float("-inf"))  # never recommend the padding item

    def scores(self, histories: torch.Tensor) -> torch.Tensor:
        """(B, n_items + 1) logits for the item after each history (at its last real position)."""
        histories = histories[:, -self.config.block_size :]
        last = (histories != PAD).sum(1).clamp(min=1) - 1
        return self(histories)[torch.arange(len(histories), device=histories.device), last]


def _pad_column(logits: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    mask[PAD] = True
    return mask


class MatrixFactorization(Fittable, nn.Module):
    """User and item vectors plus item biases; score = user · item + bias, trained with a softmax over items."""

    def __init__(self, n_users: int, n_items: int, dimensions: int = 32):
        super().__init__()
        self.users = nn.Embedding(n_users, dimensions)
        self.items = nn.Embedding(n_items + 1, dimensions, padding_idx=PAD)
        self.item_bias = nn.Parameter(torch.zeros(n_items + 1))
        nn.init.normal_(self.users.weight, std=0.1)
        nn.init.normal_(self.items.weight, std=0.1)

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        logits = self.users(users) @ self.items.weight.T + self.item_bias
        return logits.masked_fill(_pad_column(logits), float("-inf"))


# --- evaluation --------------------------------------------------------------------------


def leave_one_out(sequences: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """(known histories, test items): each user's last item is held out; everything before it is known."""
    return [s[:-1] for s in sequences], [s[-1] for s in sequences]


def rank_metrics(scores: torch.Tensor, histories: list[list[int]], targets: list[int], negatives: int, seed: int = 0):
    """HR@10 and NDCG@10 of `targets` under `scores` (users, n_items + 1), with items already in the history
    excluded. negatives=0: full ranking over every item; else the target among that many sampled unseen items."""
    generator = random.Random(seed)
    hits = gains = 0.0
    n_items = scores.shape[1] - 1
    for row, history, target in zip(scores, histories, targets):
        seen = set(history) - {target}
        if negatives:
            pool = [i for i in range(1, n_items + 1) if i not in seen and i != target]
            candidates = torch.tensor([target] + generator.sample(pool, min(negatives, len(pool))))
            rank = int((row[candidates[1:]] > row[target]).sum())
        else:
            row = row.clone()
            row[list(seen)] = float("-inf")
            rank = int((row[1:] > row[target]).sum())
        if rank < 10:
            hits += 1
            gains += 1 / math.log2(rank + 2)
    return {"hr@10": hits / len(targets), "ndcg@10": gains / len(targets)}


def popularity_scores(histories: list[list[int]], n_items: int, users: int) -> torch.Tensor:
    counts = torch.zeros(n_items + 1)
    for history in histories:
        counts.index_add_(0, torch.tensor(history, dtype=torch.long), torch.ones(len(history)))
    counts[PAD] = float("-inf")
    return counts.expand(users, -1)


def pad_histories(histories: list[list[int]], length: int) -> torch.Tensor:
    """The last `length` items of each history, right-padded with PAD."""
    rows = torch.full((len(histories), length), PAD, dtype=torch.long)
    for i, history in enumerate(histories):
        tail = history[-length:]
        rows[i, : len(tail)] = torch.tensor(tail, dtype=torch.long)
    return rows


# --- training, saving, loading -----------------------------------------------------------


def _build(kind: str, config: RecommendConfig, n_users: int, n_items: int) -> nn.Module:
    if kind == "mf":
        return MatrixFactorization(n_users, n_items, config.d_model)
    if kind == "sasrec":
        model_config = ModelConfig(
            vocab_size=n_items + 1, block_size=config.max_length, n_layers=config.n_layers, n_heads=config.n_heads,
            d_model=config.d_model, dropout=config.dropout, norm="layernorm", mlp="gelu", positions="learned",
        )  # fmt: skip
        return SASRec(model_config)
    raise LmforgeError(f"unknown recommender {kind!r}; known: sasrec, mf")


def load_data(config: RecommendConfig) -> Interactions:
    if config.data == "synthetic":
        path = write_interactions(synthetic_interactions(seed=config.seed), Path(config.out) / "synthetic.csv")
        return read_interactions(path, config.min_items)
    if not config.data:
        raise LmforgeError("recommend train needs --data: a CSV of user,item,timestamp (or 'synthetic')")
    return read_interactions(config.data, config.min_items)


def train_recommender(config: RecommendConfig, verbose: int = 1, device: str | torch.device = "cpu") -> dict:
    """Train on all but each user's last item (the one before it, the validation item in the leave-one-out
    protocol, is trained on too), on `device`; report test HR@10/NDCG@10 beside popularity; save."""
    torch.manual_seed(config.seed)
    data = load_data(config)
    if min(len(sequence) for sequence in data.sequences) < 3:
        raise LmforgeError(f"every user needs at least 3 interactions (min_items={config.min_items})")
    known, test = leave_one_out(data.sequences)
    model = _build(config.model, config, len(data.sequences), data.n_items).to(device)
    if config.model == "sasrec":
        # Next-item prediction at every position of each known history: a language model over items.
        rows = pad_histories(known, config.max_length + 1)
        x, y = rows[:, :-1], rows[:, 1:].masked_fill(rows[:, 1:] == PAD, -100)
        loss = "token_crossentropy"
    else:
        pairs = [(user, item) for user, history in enumerate(known) for item in history]
        x, y = torch.tensor([u for u, _ in pairs]), torch.tensor([i for _, i in pairs])
        loss = "sparse_categorical_crossentropy"
    model.compile("adamw", loss, from_logits=True, learning_rate=config.learning_rate, weight_decay=0.01)
    # The warmup is sized to the run (a tenth, at most 100 steps) as in every trainer, not a fixed 20 steps.
    history = model.fit(x, y, epochs=config.epochs, batch_size=config.batch_size, callbacks=[WarmupCosine()],
                        verbose=verbose, seed=config.seed)  # fmt: skip
    result = {
        "model": config.model,
        "users": len(data.sequences),
        "items": data.n_items,
        "loss": history.history["loss"],
        **evaluate_recommender(model, known, test, data.n_items, config.max_length),
    }
    save_recommender(model, config, data, result)
    return result


@torch.no_grad()
def scores_for(model: nn.Module, histories: list[list[int]], max_length: int, users=None) -> torch.Tensor:
    """(len(histories), n_items + 1) scores: SASRec reads the histories, matrix factorisation the users
    (default: rows 0..N-1, the users the histories belong to)."""
    model.eval()
    device = next(model.parameters()).device
    if isinstance(model, MatrixFactorization):
        return model(torch.tensor(users if users is not None else range(len(histories)), device=device)).cpu()
    return torch.cat(
        [
            model.scores(pad_histories(histories[i : i + 256], max_length).to(device)).cpu()
            for i in range(0, len(histories), 256)
        ]
    )


def evaluate_recommender(model, histories, targets, n_items: int, max_length: int) -> dict:
    """HR@10 / NDCG@10, full and sampled (100 negatives), for the model and the popularity baseline."""
    scores = scores_for(model, histories, max_length)
    popular = popularity_scores(histories, n_items, len(histories))
    result = {}
    for name, negatives in (("full", 0), ("sampled", 100)):
        result[name] = rank_metrics(scores, histories, targets, negatives)
        result[f"popularity_{name}"] = rank_metrics(popular, histories, targets, negatives)
    return result


def save_recommender(model: nn.Module, config: RecommendConfig, data: Interactions, result: dict) -> Path:
    """out/recommender.json (config, item ids, histories, metrics) + out/model.safetensors, replaced atomically."""
    from lmforge.atomic import write_files_atomically
    from lmforge.training.fit import save_weights

    document = {
        "config": asdict(config),
        "model_config": model.config.to_dict() if isinstance(model, SASRec) else None,
        "item_ids": data.item_ids,
        "user_ids": data.user_ids,
        "histories": data.sequences,
        "metrics": result,
    }
    return write_files_atomically(
        config.out,
        {
            "model.safetensors": lambda path: save_weights(model, path),
            "recommender.json": lambda path: path.write_text(json.dumps(document) + "\n"),
        },
    )


class Recommender:
    """A saved recommender: `recommend(history=[item ids], k)` or `recommend(user=id, k)` → [(item id, score)]."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        from safetensors.torch import load_model

        folder = Path(folder)
        try:
            document = json.loads((folder / "recommender.json").read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise LmforgeError(f"{folder}: not a saved recommender ({error})") from None
        self.config = RecommendConfig(**document["config"])
        self.item_ids, self.user_ids = document["item_ids"], document["user_ids"]
        self.histories = document["histories"]
        self.index = {item: i + 1 for i, item in enumerate(self.item_ids)}
        self.users = {user: i for i, user in enumerate(self.user_ids)}
        if self.config.model == "sasrec":
            self.model = SASRec(ModelConfig.from_dict(document["model_config"]))
        else:
            self.model = _build("mf", self.config, len(self.user_ids), len(self.item_ids))
        load_model(self.model, str(folder / "model.safetensors"))
        self.model.to(device).eval()

    def evaluate(self) -> dict:
        """HR@10 / NDCG@10 (full and sampled) on each user's last item, beside the popularity baseline."""
        known, targets = leave_one_out(self.histories)
        return evaluate_recommender(self.model, known, targets, len(self.item_ids), self.config.max_length)

    def recommend(
        self, history: list[str] | None = None, user: str | None = None, k: int = 10
    ) -> list[tuple[str, float]]:
        if user is not None:
            if user not in self.users:
                raise LmforgeError(f"unknown user {user!r}")
            row = self.users[user]
            indices = self.histories[row]
        else:
            unknown = [item for item in history or [] if item not in self.index]
            if unknown:
                raise LmforgeError(f"unknown items {unknown[:5]}")
            if not history:
                raise LmforgeError("give a history of item ids or a known user")
            indices, row = [self.index[item] for item in history], None
        if row is None and isinstance(self.model, MatrixFactorization):
            raise LmforgeError("matrix factorisation recommends for known users only; use a sasrec model for histories")
        scores = scores_for(self.model, [indices], self.config.max_length, [row])[0]
        scores[indices] = float("-inf")  # not what the user already has
        top = scores.topk(min(k, len(self.item_ids) - len(set(indices))))
        return [(self.item_ids[i - 1], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]


# Ids are the log's text ("31", "i7"); a client may send MovieLens's numbers as JSON numbers. Integers only:
# a float such as 31.0 names no id in the file.
ItemId = Annotated[StrictInt | str, AfterValidator(str)]


class RecommendRequest(BaseModel):
    history: list[ItemId] | None = Field(default=None, max_length=10_000)  # item ids, oldest first
    user: ItemId | None = None
    k: int = Field(default=10, ge=1, le=1000)


def build_app(recommender: Recommender):
    """A small HTTP API: POST /v1/recommend {"history": [...]} or {"user": ...}, "k" → top-k items; GET /health."""
    from fastapi import FastAPI

    from lmforge.serve.errors import APIError, use_openai_errors

    app = FastAPI(title="lmforge recommend")
    use_openai_errors(app, validation_status=422)  # the main server's error shape; 422 as this API always said

    @app.get("/health")
    def health():
        return {"status": "ok", "items": len(recommender.item_ids), "model": recommender.config.model}

    @app.post("/v1/recommend")
    def recommend(request: RecommendRequest):
        try:
            items = recommender.recommend(request.history, request.user, request.k)
        except LmforgeError as error:  # an unknown item or user
            raise APIError(400, str(error), param="user" if request.user is not None else "history") from None
        return {"items": [{"item": item, "score": score} for item, score in items]}

    return app
