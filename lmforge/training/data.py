"""Corpus → token shards on disk, and loaders that read windows back from them.

`prepare` streams text files, folders and JSONL through a tokenizer into numpy memmap
shards (uint16 when the vocabulary fits, else uint32) with a train/val split and a JSON
manifest. `TokenDataset` samples random windows for pretraining (reproducible from a
torch.Generator whose state checkpoints save) or walks them in order for evaluation.
`read_records` / `read_labelled_texts` read the tables (CSV, JSONL, Parquet) fine-tuning learns from.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.atomic import write_text_atomically
from lmforge.errors import LmforgeError, missing_extra
from lmforge.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl",)
MAX_CHUNK_BYTES = 1 << 20


@dataclass
class TextPiece:
    """A run of whole lines (or one JSONL record) and where it came from."""

    text: str
    source: Path
    size_bytes: int
    starts_document: bool


def list_source_files(sources: list[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into the text and JSONL files to read, sorted."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise LmforgeError(f"{path}: folder holds no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise LmforgeError(f"{path}: no such file or folder")
    return files


def _decode_line(raw: bytes, path: Path, line_number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise LmforgeError(
            f"{path}:{line_number}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
        ) from None


def read_pieces(files: list[Path], text_field: str = "text", chunk_bytes: int = MAX_CHUNK_BYTES) -> Iterator[TextPiece]:
    """Stream the corpus as pieces of at most ~chunk_bytes, never holding a whole file in memory."""
    for path in files:
        if path.suffix in JSONL_SUFFIXES:
            yield from _read_jsonl(path, text_field)
            continue
        lines: list[str] = []
        size = 0
        first = True
        with path.open("rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                lines.append(_decode_line(raw, path, line_number))
                size += len(raw)
                if size >= chunk_bytes:
                    yield TextPiece("".join(lines), path, size, first)
                    lines, size, first = [], 0, False
        if lines:
            yield TextPiece("".join(lines), path, size, first)


def _jsonl_objects(path: Path) -> Iterator[tuple[int, int, dict]]:
    """(line number, bytes of the line, object) for each non-blank line of a JSONL file."""
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            line = _decode_line(raw, path, line_number).strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise LmforgeError(
                    f"{path}:{line_number}: invalid JSON ({error.msg} at column {error.colno})"
                ) from None
            if not isinstance(record, dict):
                raise LmforgeError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            yield line_number, len(raw), record


def _read_jsonl(path: Path, text_field: str) -> Iterator[TextPiece]:
    for line_number, size, record in _jsonl_objects(path):
        if text_field not in record:
            raise LmforgeError(f"{path}:{line_number}: record has no field {text_field!r}")
        text = record[text_field]
        if not isinstance(text, str):
            raise LmforgeError(
                f"{path}:{line_number}: field {text_field!r} is {type(text).__name__}, expected a string"
            )
        yield TextPiece(text, path, size, True)


TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")


def read_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) from a CSV/TSV (header row), JSONL or Parquet file; Parquet rows count from 1."""
    path = Path(path)
    if path.suffix not in TABLE_SUFFIXES:
        raise LmforgeError(f"{path}: expected one of {', '.join(TABLE_SUFFIXES)}")
    if not path.is_file():
        raise LmforgeError(f"{path}: no such file")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise missing_extra(f"{path}: reading Parquet", "pyarrow", "parquet") from None
        try:
            table = parquet.read_table(path)
        except Exception as error:  # pyarrow raises its own error types for a bad file
            raise LmforgeError(f"{path}: not a readable Parquet file ({error})") from None
        yield from enumerate(table.to_pylist(), start=1)
    elif path.suffix == ".jsonl":
        yield from ((line_number, record) for line_number, _, record in _jsonl_objects(path))
    else:
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle, delimiter="\t" if path.suffix == ".tsv" else ",")
                for record in reader:
                    if None in record:
                        raise LmforgeError(
                            f"{path}:{reader.line_num}: more fields than the header's {reader.fieldnames}"
                        )
                    yield reader.line_num, record
        except UnicodeDecodeError as error:
            raise LmforgeError(f"{path}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
        except csv.Error as error:
            raise LmforgeError(f"{path}: malformed CSV ({error})") from None


@dataclass
class LabelledTexts:
    """Texts with class ids; `label_names[i]` is what class i was called in the file."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]


def read_labelled_texts(
    path: str | Path, text_field: str = "text", label_field: str = "label", label_names: list[str] | None = None
) -> LabelledTexts:
    """Texts and labels from CSV/TSV/JSONL/Parquet. Labels may be names or integers; names are
    numbered in sorted order unless `label_names` (say, the training set's) fixes the numbering."""
    texts, raw_labels = [], []
    for line_number, record in read_records(path):
        for name in (text_field, label_field):
            if record.get(name) in (None, ""):
                raise LmforgeError(f"{path}:{line_number}: missing field {name!r} (fields: {sorted(record)})")
        if not isinstance(record[text_field], str):
            raise LmforgeError(
                f"{path}:{line_number}: field {text_field!r} is {type(record[text_field]).__name__}, expected text"
            )
        texts.append(record[text_field])
        raw_labels.append(str(record[label_field]).strip())
    if not texts:
        raise LmforgeError(f"{path}: no records")
    if label_names is None:
        names = set(raw_labels)
        numeric = all(name.lstrip("-").isdigit() for name in names)
        label_names = sorted(names, key=int) if numeric else sorted(names)
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(raw_labels) - set(index))
    if unknown:
        raise LmforgeError(f"{path}: labels {unknown[:5]} are not among the known classes {label_names}")
    return LabelledTexts(texts, [index[label] for label in raw_labels], list(label_names))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Appends token arrays to `{split}_{index:03d}.bin` files of at most `shard_tokens` tokens."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._handle = None
        self._in_shard = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._handle is None or self._in_shard == self.shard_tokens:
                self._open_next()
            take = min(len(tokens), self.shard_tokens - self._in_shard)
            tokens[:take].tofile(self._handle)
            self._in_shard += take
            self.shards[-1]["tokens"] += take
            tokens = tokens[take:]

    def _open_next(self) -> None:
        if self._handle is not None:
            self._handle.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._handle = (self.directory / name).open("wb")
        self.shards.append({"file": name, "tokens": 0})
        self._in_shard = 0

    def close(self) -> list[dict]:
        if self._handle is not None:
            self._handle.close()
        return self.shards


def prepare(
    sources: list[str | Path],
    out_dir: str | Path,
    tokenizer: str | Tokenizer = "char",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    text_field: str = "text",
    shard_tokens: int = 100_000_000,
    progress=None,
) -> dict:
    """Tokenize a corpus into train/val shards under `out_dir`; returns the manifest.

    `tokenizer` is 'char', 'bpe' (trained here on the corpus), a tokenizer JSON path, or an
    instance. The last `val_fraction` of the corpus bytes goes to the validation split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise LmforgeError(f"val_fraction={val_fraction}: must be in [0, 1)")
    files = list_source_files(sources)
    total_bytes = sum(p.stat().st_size for p in files)
    if total_bytes == 0:
        raise LmforgeError(f"empty corpus: {', '.join(map(str, files))} hold no text")
    # Pieces small enough that the validation tail gets several of them.
    chunk_bytes = max(1, min(MAX_CHUNK_BYTES, int(total_bytes * val_fraction / 8) or MAX_CHUNK_BYTES))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, str):
        if tokenizer in ("char", "bpe"):
            tokenizer = train_tokenizer(
                tokenizer, (p.text for p in read_pieces(files, text_field, chunk_bytes)), vocab_size
            )
        else:
            tokenizer = load_tokenizer(tokenizer)
    tokenizer.save(out / TOKENIZER_FILE)

    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    writers = {split: ShardWriter(out, split, dtype, shard_tokens) for split in ("train", "val")}
    eos = tokenizer.eos_id
    bytes_done = 0
    text_chars = 0
    for piece in read_pieces(files, text_field, chunk_bytes):
        split = "val" if bytes_done >= (1.0 - val_fraction) * total_bytes and val_fraction > 0 else "train"
        ids = tokenizer.encode(piece.text)
        if piece.starts_document and eos is not None:
            ids = [eos, *ids]  # documents are separated (and introduced) by end-of-text
        writers[split].write(np.asarray(ids, dtype=np.int64))
        bytes_done += piece.size_bytes
        text_chars += len(piece.text)
        if progress is not None:
            progress(bytes_done, total_bytes)
    splits = {
        split: {"shards": writer.close(), "tokens": sum(s["tokens"] for s in writer.shards)}
        for split, writer in writers.items()
    }
    if text_chars == 0:
        raise LmforgeError(f"empty corpus: {', '.join(map(str, files))} hold no text")
    if val_fraction > 0 and splits["val"]["tokens"] == 0:
        raise LmforgeError(
            f"validation split is empty: the corpus ({total_bytes} bytes) is too small to hold "
            f"out {val_fraction:.0%} by whole lines; add text or set val_fraction=0"
        )
    manifest = {
        "format": 1,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "splits": splits,
        "sources": [{"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files],
    }
    write_text_atomically(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def load_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        raise LmforgeError(f"{data_dir}: no {MANIFEST}; run `lmforge prepare` to create the dataset")
    return json.loads(path.read_text())


class TokenDataset:
    """Read-only view of one split's shards, memory-mapped."""

    def __init__(self, data_dir: str | Path, split: str = "train"):
        self.data_dir = Path(data_dir)
        self.manifest = load_manifest(data_dir)
        if split not in self.manifest["splits"]:
            raise LmforgeError(f"{data_dir}: no split {split!r}; available: {sorted(self.manifest['splits'])}")
        dtype = np.dtype(self.manifest["dtype"])
        self.shards = [
            np.memmap(self.data_dir / s["file"], dtype=dtype, mode="r")
            for s in self.manifest["splits"][split]["shards"]
            if s["tokens"] > 0
        ]
        self.split = split
        self.num_tokens = sum(len(s) for s in self.shards)

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.data_dir / self.manifest["tokenizer"])

    def _check_length(self, block_size: int) -> None:
        if not self.shards or max(len(s) for s in self.shards) <= block_size:
            raise LmforgeError(
                f"{self.data_dir}: the {self.split} split has {self.num_tokens} tokens, too few for "
                f"one window of block_size+1={block_size + 1}; use more text or a smaller block_size"
            )

    def sample_starts(self, count: int, block_size: int, generator: torch.Generator) -> list[tuple[int, int]]:
        """`count` random (shard, offset) window starts, uniform over all windows."""
        self._check_length(block_size)
        windows = np.array([max(len(s) - block_size, 0) for s in self.shards], dtype=np.int64)
        cumulative = np.cumsum(windows)
        draws = torch.randint(int(cumulative[-1]), (count,), generator=generator).numpy()
        shard_indices = np.searchsorted(cumulative, draws, side="right")
        offsets = draws - np.concatenate([[0], cumulative[:-1]])[shard_indices]
        return list(zip(shard_indices.tolist(), offsets.tolist()))

    def gather(self, starts: list[tuple[int, int]], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets (int64, shape (len(starts), block_size)) at the given starts."""
        windows = np.stack([self.shards[s][o : o + block_size + 1].astype(np.int64) for s, o in starts])
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]

    def iterate(
        self,
        block_size: int,
        batch_size: int,
        max_tokens: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows in order, covering the split (or its first max_tokens targets)."""
        self._check_length(block_size)
        starts = [(i, o) for i, shard in enumerate(self.shards) for o in range(0, len(shard) - block_size, block_size)]
        if max_tokens is not None:
            starts = starts[: max(1, max_tokens // block_size)]
        for first in range(0, len(starts), batch_size):
            yield self.gather(starts[first : first + batch_size], block_size)
