"""Sequence classification on any lmforge decoder or BERT encoder: pooling + a linear head, trained with `fit`.

`finetune_classifier` is `lmforge finetune --task classify`: read a labelled table, fine-tune
(in full or with LoRA), report accuracy / macro-F1 / a confusion-matrix PNG, save a folder
that `TextClassifier` reads back. Under torchrun, `parallel=fsdp/hsdp` shards the model (`fit.compile`);
the classifier written is one whole folder.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from lmforge.apps.encoder import BUILTIN_ENCODERS, Encoder, load_encoder
from lmforge.atomic import remove, write_files_atomically
from lmforge.errors import LmforgeError
from lmforge.evaluation.metrics import confusion_matrix, macro_f1, save_confusion_matrix_png
from lmforge.model import ModelConfig, Transformer
from lmforge.settings import ClassifyConfig
from lmforge.training import distributed
from lmforge.training.data import read_labelled_texts
from lmforge.training.fit import (
    EarlyStopping,
    Fittable,
    ModelCheckpoint,
    WarmupCosine,
    load_weights,
    save_weights,
)
from lmforge.training.parallelize import gather_full_weights, weightless_copy, writes_sharded_checkpoints
from lmforge.training.pretrain import resolve_device
from lmforge.training.run_folder import (
    SHARDED_TRAINING_STATE,
    TRAINING_STATE,
    claim_fine_tune_folder,
    fine_tune_checkpointing,
    settings_to_record,
)

POOLINGS = ("last", "mean", "first")
CLASSIFIER_CONFIG = "classifier.json"
CLASSIFIER_WEIGHTS = "model.safetensors"
CLASSIFIER_TOKENIZER = "tokenizer.json"
# What finetune_classifier writes into `out`.
RUN_FILES = (CLASSIFIER_CONFIG, CLASSIFIER_WEIGHTS, CLASSIFIER_TOKENIZER, "metrics.json", "confusion_matrix.png")
RUN_FILES += (TRAINING_STATE, SHARDED_TRAINING_STATE)


class SequenceClassifier(Fittable, nn.Module):
    """Token ids (B, T) + attention mask → class logits (B, classes).

    Pooling: "last" reads the last real token (the one a causal decoder has seen everything
    by), "mean" averages the real tokens, "first" reads the first ([CLS] in BERT).
    """

    def __init__(self, backbone: Transformer | Encoder, classes: int, pooling: str = "last", dropout: float = 0.1):
        super().__init__()
        if pooling not in POOLINGS:
            raise LmforgeError(f"unknown pooling {pooling!r}; known: {POOLINGS}")
        self.backbone, self.pooling = backbone, pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.config.d_model, classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def features(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if isinstance(self.backbone, Encoder):
            return self.backbone(tokens, attention_mask)
        # Causal attention: right padding comes after every real token, so it changes none of them.
        return self.backbone.hidden_states(tokens)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Rows are padded to the longest text of the whole set; a batch needs only its own longest.
        longest = int(attention_mask.sum(1).max())
        tokens, attention_mask = tokens[:, :longest], attention_mask[:, :longest]
        hidden = self.features(tokens, attention_mask)
        if self.pooling == "last":
            last = attention_mask.sum(1).clamp(min=1) - 1
            pooled = hidden[torch.arange(len(tokens), device=tokens.device), last]
        elif self.pooling == "mean":
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        else:
            pooled = hidden[:, 0]
        return self.head(self.dropout(pooled))


def tokenize_texts(tokenizer, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, attention_mask), both (N, longest ≤ max_tokens), right-padded with the tokenizer's padding
    id, from an lmforge or HF tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer

    if isinstance(tokenizer, HFTokenizer):  # a BERT tokenizer adds [CLS] ... [SEP] and truncates to keep [SEP]
        tokenizer.enable_truncation(max_tokens)
        tokenizer.no_padding()
        rows = [encoding.ids for encoding in tokenizer.encode_batch(texts)]
    else:
        rows = [tokenizer.encode(text)[:max_tokens] for text in texts]
    longest = max(1, max(len(row) for row in rows))
    tokens = torch.full((len(rows), longest), pad_id_of(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return tokens, mask


class WordVocabulary:
    """Keras's `Tokenizer(num_words)` + `pad_sequences`: lower-cased words, the `size` - 2 most frequent
    kept (0 pads, 1 stands for any other word), sequences cut or padded at the end to one length."""

    pattern = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")

    def __init__(self, texts: list[str], size: int = 10_000):
        counts = Counter(word for text in texts for word in self.words(text))
        ranked = sorted(counts, key=lambda word: (-counts[word], word))[: size - 2]
        self.index = {word: i + 2 for i, word in enumerate(ranked)}
        self.size = size

    def words(self, text: str) -> list[str]:
        return self.pattern.findall(text.lower())

    def encode(self, texts: list[str], length: int) -> torch.Tensor:
        rows = torch.zeros(len(texts), length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.index.get(word, 1) for word in self.words(text)][:length]
            rows[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return rows


def pad_id_of(tokenizer) -> int:
    from tokenizers import Tokenizer as HFTokenizer

    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.token_to_id("[PAD]") or 0
    return tokenizer.padding_id


def load_backbone(name_or_path: str) -> tuple[Transformer | Encoder, object, int]:
    """(backbone in fp32, tokenizer, max tokens) from a built-in encoder, or any model `lmforge.load` reads."""
    if name_or_path in BUILTIN_ENCODERS or (Path(name_or_path) / "config.json").exists() and _is_bert(name_or_path):
        return load_encoder(name_or_path)
    from lmforge.formats.loading import load

    model, tokenizer = load(name_or_path, keep_quantized=False)
    return model, tokenizer, model.config.block_size


def _is_bert(folder: str) -> bool:
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type") == "bert"
    except (OSError, json.JSONDecodeError):
        return False


def train_test_split(texts: list[str], labels: list[int], fraction: float, seed: int = 0):
    """((texts, labels), (held-out texts, labels)): a seeded random `fraction` held out."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    held = max(1, int(len(texts) * fraction))
    pick = lambda index: ([texts[i] for i in index], [labels[i] for i in index])  # noqa: E731
    return pick(order[held:]), pick(order[:held])


def finetune_classifier(config: ClassifyConfig, verbose: int = 1) -> dict:
    """Fine-tune a classifier and save it to `config.out`; returns the validation metrics and the history."""
    from lmforge.finetune.lora import LoraConfig, apply_lora, count_trainable, remove_lora

    if not config.data:
        raise LmforgeError("classification needs data: a CSV/TSV/JSONL/Parquet file with text and label columns")
    torch.manual_seed(config.seed)
    train = read_labelled_texts(config.data, config.text_field, config.label_field)
    if config.validation:
        validation = read_labelled_texts(config.validation, config.text_field, config.label_field, train.label_names)
        train_texts, train_labels = train.texts, train.labels
        val_texts, val_labels = validation.texts, validation.labels
    else:
        (train_texts, train_labels), (val_texts, val_labels) = train_test_split(
            train.texts, train.labels, config.validation_split, config.seed
        )
    classes = len(train.label_names)
    if classes < 2:
        raise LmforgeError(f"{config.data}: needs at least 2 classes, found {train.label_names}")
    out = Path(config.out)
    device = resolve_device(config.device)
    processes = distributed.init_process_group(device.type)  # under torchrun: one process moves and writes files
    if processes.is_main:
        claim_fine_tune_folder(out, RUN_FILES, config, "classifier", verbose)

    backbone, tokenizer, backbone_tokens = load_backbone(config.model)
    pooling = config.pooling or ("mean" if isinstance(backbone, Encoder) else "last")
    classifier = SequenceClassifier(backbone, classes, pooling, config.dropout).to(device)
    max_tokens = min(config.max_tokens, backbone_tokens)
    x_train = tokenize_texts(tokenizer, train_texts, max_tokens)
    x_val = tokenize_texts(tokenizer, val_texts, max_tokens)
    y_train, y_val = torch.tensor(train_labels), torch.tensor(val_labels)

    if config.lora_rank:
        apply_lora(
            classifier,
            LoraConfig(config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets, ("head",)),
        )
    out.mkdir(parents=True, exist_ok=True)
    # Sharded over processes, the trained weights are gathered into a weightless copy taken now, before
    # compile shards the classifier, and written from it (as `finetune_chat` does).
    sharded = processes.is_distributed and writes_sharded_checkpoints(config)
    whole = weightless_copy(classifier) if sharded else classifier
    if verbose:
        print(
            f"{len(train_texts):,} training / {len(val_texts):,} validation texts, {classes} classes; "
            f"{count_trainable(classifier):,} of {sum(p.numel() for p in classifier.parameters()):,} parameters train"
            + (f"; {config.parallel} over {processes.world_size} processes" if sharded else "")
        )
    classifier.compile(
        "adamw",
        "sparse_categorical_crossentropy",
        ["accuracy", "macro_f1"],
        from_logits=True,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        parallelism=config.parallelism(),
    )
    class_weight = None
    if config.balanced_class_weights:  # scikit-learn's "balanced": n / (classes * count of the class)
        counts = torch.bincount(y_train, minlength=classes).clamp(min=1)
        class_weight = {i: len(y_train) / (classes * int(counts[i])) for i in range(classes)}
    best = out / "best.safetensors"
    schedule = WarmupCosine(config.warmup_steps)
    history = classifier.fit(
        x_train,
        y_train,
        epochs=config.epochs,
        batch_size=config.batch_size,
        validation_data=(x_val, y_val),
        callbacks=[
            schedule,
            EarlyStopping("val_loss", patience=config.patience),
            ModelCheckpoint(best, "val_loss"),
        ],
        class_weight=class_weight,
        accumulation_steps=config.accumulation_steps,
        verbose=verbose,
        seed=config.seed,
        **fine_tune_checkpointing(out, config, writes_sharded_checkpoints(config)),
    )
    load_weights(classifier, best)  # the epoch with the lowest validation loss
    distributed.wait_for_every_process()  # every process has read it before the main one removes it
    if processes.is_main:
        best.unlink()
    # Sharded, every process predicts with the sharded model (its forward needs them all), adapters apart.
    logits = classifier.predict(x_val, batch_size=config.batch_size)
    if sharded:
        gather_full_weights(classifier, whole, processes.is_main)
    if config.lora_rank and processes.is_main:
        remove_lora(whole)
    predicted = logits.argmax(-1)
    matrix = confusion_matrix(predicted, y_val, classes)
    result = {
        "accuracy": (predicted == y_val).float().mean().item(),
        "macro_f1": macro_f1(matrix),
        "validation_examples": len(y_val),
        "label_names": train.label_names,
        "confusion_matrix": matrix.tolist(),
        "history": history.history,
        "warmup_steps": schedule.warmup_steps,
        "reached_peak_learning_rate": schedule.reached_peak,
    }
    if processes.is_main:  # every process holds the same trained weights: one writes them
        save_classifier(out, whole, tokenizer, train.label_names, max_tokens, config.model)
        save_confusion_matrix_png(
            matrix,
            out / "confusion_matrix.png",
            f"accuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f}",
            train.label_names,
        )
        metrics = json.dumps({**result, "config": settings_to_record(config)}, indent=2)
        (out / "metrics.json").write_text(metrics + "\n")
        for state in (TRAINING_STATE, SHARDED_TRAINING_STATE):  # the run is complete: nothing left to resume
            remove(out / state)
    distributed.shutdown(processes)
    return result


def save_classifier(folder, classifier: SequenceClassifier, tokenizer, label_names, max_tokens: int, base_model: str):
    """A folder `TextClassifier` reads: classifier.json, model.safetensors, tokenizer.json; replaced atomically."""
    backbone = classifier.backbone
    document = {
        "backbone": "encoder" if isinstance(backbone, Encoder) else "decoder",
        "model_config": backbone.config.to_dict(),
        "type_vocab_size": backbone.token_type_embedding.num_embeddings if isinstance(backbone, Encoder) else None,
        "label_names": list(label_names),
        "pooling": classifier.pooling,
        "max_tokens": max_tokens,
        "base_model": base_model,
    }
    return write_files_atomically(
        folder,
        {
            CLASSIFIER_WEIGHTS: lambda path: save_weights(classifier, path),
            CLASSIFIER_TOKENIZER: lambda path: tokenizer.save(str(path)),
            CLASSIFIER_CONFIG: lambda path: path.write_text(json.dumps(document, indent=2) + "\n"),
        },
    )


class TextClassifier:
    """A saved classifier: `predict(["great film"])` → label names, `probabilities(texts)` → (N, classes)."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from safetensors.torch import load_model

        folder = Path(folder)
        try:
            document = json.loads((folder / CLASSIFIER_CONFIG).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise LmforgeError(f"{folder}: not a saved classifier ({error})") from None
        config = ModelConfig.from_dict(document["model_config"])
        if document["backbone"] == "encoder":
            from tokenizers import Tokenizer as HFTokenizer

            backbone = Encoder(config, document["type_vocab_size"])
            self.tokenizer = HFTokenizer.from_file(str(folder / CLASSIFIER_TOKENIZER))
        else:
            from lmforge.tokenizer import load_tokenizer

            backbone = Transformer(config, init_weights=False)
            self.tokenizer = load_tokenizer(folder / CLASSIFIER_TOKENIZER)
        self.label_names = document["label_names"]
        self.max_tokens = document["max_tokens"]
        self.model = SequenceClassifier(backbone, len(self.label_names), document["pooling"])
        load_model(self.model, str(folder / CLASSIFIER_WEIGHTS))
        self.model.to(device).eval()

    @torch.no_grad()
    def probabilities(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        tokens, mask = tokenize_texts(self.tokenizer, list(texts), self.max_tokens)
        return self.model.predict((tokens, mask), batch_size).softmax(-1)

    def predict(self, texts: list[str]) -> list[str]:
        return [self.label_names[i] for i in self.probabilities(texts).argmax(-1).tolist()]
