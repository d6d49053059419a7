"""Tokenizers: character-level with byte fallback, and HF `tokenizers` ones (byte-level BPE trained here, or imported).

Both encode any Unicode string and decode it back exactly, carry the same special tokens
(bos/eos/pad and ChatML roles), and save to / load from one JSON file.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError

BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"
CHAT_START, CHAT_END = "<|im_start|>", "<|im_end|>"
DEFAULT_SPECIAL_TOKENS = (BOS, EOS, PAD, CHAT_START, CHAT_END)
# What llama.cpp ends a turn on (its end-of-generation set), where the vocabulary has them as special tokens.
END_OF_TURN_TOKENS = (
    "<|eot_id|>",
    "<|eom_id|>",
    CHAT_END,
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
)
FORMAT_VERSION = 1


class Tokenizer:
    """Common interface: `encode`, `decode`, `vocab_size`, special-token ids, `save`."""

    kind: str
    special_tokens: list[str]
    # Which special tokens play which part; imported models name their own.
    bos_token: str | None = BOS
    eos_token: str | None = EOS
    pad_token: str | None = PAD
    chat_template: str | None = None
    # What the model's files say a plain text gets around it (GGUF `tokenizer.ggml.add_bos_token`,
    # tokenizer_config.json `add_bos_token`): Llama and Gemma expect a BOS first, Qwen and GPT-2 nothing.
    add_bos_token: bool = False
    add_eos_token: bool = False
    # Tokens besides eos that end an assistant turn (GGUF eot/eom ids, generation_config.json's eos list).
    end_of_turn_tokens: tuple[str, ...] = ()

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in text are encoded as plain text."""
        raise NotImplementedError

    def encode_marked(self, pieces: Iterable[tuple[str, bool]]) -> list[int]:
        """Token ids of the concatenated `pieces` ((text, is_markup) pairs): special-token strings
        become their ids only inside markup; anywhere else they are plain text.

        The text is split at those special tokens and each stretch between them encoded as plain
        text, which is how HF `tokenizers` treats added tokens, so an honest prompt gets exactly
        the ids it would get with special-token parsing on.
        """
        ids: list[int] = []
        stretch: list[str] = []
        for text, is_markup in pieces:
            if not is_markup:
                stretch.append(text)
                continue
            last = 0
            for match in _special_token_pattern(tuple(self.special_tokens)).finditer(text):
                stretch.append(text[last : match.start()])
                ids.extend(self.encode("".join(stretch)) if any(stretch) else [])
                stretch.clear()
                ids.append(self.token_to_id(match.group()))
                last = match.end()
            stretch.append(text[last:])
        if any(stretch):
            ids.extend(self.encode("".join(stretch)))
        return ids

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """Token ids of trusted text (a chat template's markup, a prompt written by the operator)
        in which special-token strings stand for their tokens."""
        return self.encode_marked([(text, True)])

    def with_document_marks(self, ids: list[int]) -> list[int]:
        """`ids` of a plain text with the BOS/EOS the model's files ask for, as llama.cpp and transformers add
        them (`add_special`/`add_special_tokens`); a BOS already there is not doubled."""
        bos, eos = self.bos_id, self.eos_id
        if self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        if self.add_eos_token and eos is not None:
            ids = [*ids, eos]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token stands for (0 for special tokens); used for bits-per-byte."""
        raise NotImplementedError

    def _payload(self) -> dict:
        raise NotImplementedError

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def pad_id(self) -> int | None:
        return self.token_to_id(self.pad_token) if self.pad_token else None

    @property
    def padding_id(self) -> int:
        """What fills a batch's short rows: the pad token, else end-of-text, else 0 (never attended to or scored)."""
        return next((i for i in (self.pad_id, self.eos_id) if i is not None), 0)

    @property
    def document_start_id(self) -> int | None:
        """The token put before a text so that its first token is predicted too: the BOS where the model's files
        ask for one (Llama, Gemma: what they were trained with), else end-of-text (which separates documents in
        training data), else beginning-of-text."""
        if self.add_bos_token and self.bos_id is not None:
            return self.bos_id
        return self.eos_id if self.eos_id is not None else self.bos_id

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as one JSON file."""
        document = {
            "lmforge_tokenizer": FORMAT_VERSION,
            "kind": self.kind,
            "special_tokens": self.special_tokens,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "chat_template": self.chat_template,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "end_of_turn_tokens": list(self.end_of_turn_tokens),
            **self._payload(),
        }
        Path(path).write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")

    def _load_common(self, document: dict) -> None:
        for name in ("bos_token", "eos_token", "pad_token", "chat_template"):
            setattr(self, name, document.get(name))
        self.add_bos_token = bool(document.get("add_bos_token", False))
        self.add_eos_token = bool(document.get("add_eos_token", False))
        self.end_of_turn_tokens = tuple(document.get("end_of_turn_tokens", ()))


@functools.lru_cache(maxsize=16)
def _special_token_pattern(special_tokens: tuple[str, ...]) -> re.Pattern:
    # Longest first, so a token that is a prefix of another never wins.
    alternatives = sorted((re.escape(token) for token in special_tokens if token), key=len, reverse=True)
    return re.compile("|".join(alternatives) or r"(?!)")


class CharTokenizer(Tokenizer):
    """One token per character seen in training; unseen characters fall back to UTF-8 bytes.

    Id layout: special tokens, then the 256 byte tokens, then the characters.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str], special_tokens: Iterable[str] = DEFAULT_SPECIAL_TOKENS):
        self.special_tokens = list(special_tokens)
        self.chars = sorted(set(chars))
        self._byte_offset = len(self.special_tokens)
        self._char_offset = self._byte_offset + 256
        self._char_to_id = {c: self._char_offset + i for i, c in enumerate(self.chars)}
        self._special_to_id = {t: i for i, t in enumerate(self.special_tokens)}

    @classmethod
    def train(cls, texts: Iterable[str], special_tokens: Iterable[str] = DEFAULT_SPECIAL_TOKENS) -> CharTokenizer:
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return cls(chars, special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._char_offset + len(self.chars)

    def encode(self, text: str) -> list[int]:
        ids = []
        for char in text:
            token = self._char_to_id.get(char)
            if token is not None:
                ids.append(token)
            else:
                ids.extend(self._byte_offset + b for b in char.encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        pieces: list[str] = []
        pending = bytearray()
        for token in ids:
            token = int(token)
            if self._byte_offset <= token < self._char_offset:
                pending.append(token - self._byte_offset)
                continue
            if pending:
                pieces.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            if token < self._byte_offset:
                pieces.append(self.special_tokens[token])
            else:
                pieces.append(self.chars[token - self._char_offset])
        if pending:
            pieces.append(pending.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def token_to_id(self, token: str) -> int | None:
        return self._special_to_id.get(token, self._char_to_id.get(token))

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        lengths[self._byte_offset : self._char_offset] = 1
        lengths[self._char_offset :] = [len(c.encode("utf-8")) for c in self.chars]
        return lengths

    def _payload(self) -> dict:
        return {"chars": self.chars}

    def to_hf(self):
        """The same tokenizer as an HF `tokenizers` object (for tokenizer.json): BPE with no merges and
        byte fallback, so each known character is one token and anything else its UTF-8 bytes."""
        from tokenizers import AddedToken, decoders, models
        from tokenizers import Tokenizer as HFTokenizer

        vocab = {token: i for i, token in enumerate(self.special_tokens)}
        vocab.update({f"<0x{b:02X}>": self._byte_offset + b for b in range(256)})
        vocab.update(self._char_to_id)
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
        hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in self.special_tokens])
        return hf


class BPETokenizer(Tokenizer):
    """A tokenizer run by the HF `tokenizers` library: byte-level BPE trained here (GPT-2 style), or
    whatever an imported model's tokenizer.json / GGUF vocabulary describes."""

    kind = "bpe"

    def __init__(self, hf_tokenizer, special_tokens: Iterable[str] = DEFAULT_SPECIAL_TOKENS):
        self.hf = hf_tokenizer
        # `encode` takes untrusted text: a typed "<|im_end|>" must stay text (transformers'
        # split_special_tokens=True, llama.cpp's parse_special=false); markup goes through encode_marked.
        self.hf.encode_special_tokens = True
        self.special_tokens = list(special_tokens)

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, special_tokens: Iterable[str] = DEFAULT_SPECIAL_TOKENS
    ) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        special_tokens = list(special_tokens)
        minimum = 256 + len(special_tokens)
        if vocab_size < minimum:
            raise LmforgeError(
                f"vocab_size={vocab_size} is too small for byte-level BPE: "
                f"need at least {minimum} (256 bytes + {len(special_tokens)} special tokens)"
            )
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def token_byte_lengths(self) -> np.ndarray:
        try:  # "▁the" is 4 bytes of text and "<0x41>" one: the pieces' own bytes, special tokens none
            pieces, special_ids = token_bytes(self)
        except LmforgeError:  # WordPiece, Unigram, ...: the pieces' spelling
            return self._spelled_byte_lengths()
        lengths = np.array([len(piece) for piece in pieces], dtype=np.int64)
        lengths[special_ids] = 0
        return lengths

    def _spelled_byte_lengths(self) -> np.ndarray:
        from tokenizers import pre_tokenizers

        # Byte-level BPE writes each byte as one printable character of this alphabet.
        byte_alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        special = set(self.special_tokens)
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token_id in range(self.vocab_size):
            token = self.hf.id_to_token(token_id)
            if token is None or token in special:
                continue
            if all(ch in byte_alphabet for ch in token):
                lengths[token_id] = len(token)
            else:
                lengths[token_id] = len(token.encode("utf-8"))
        return lengths

    def _payload(self) -> dict:
        # HF's JSON kept as one string: loading then parses it once, in Rust, instead of building
        # ~100k Python objects for the vocabulary and merges (~15 MB of RSS that stays).
        return {"hf_tokenizer": self.hf.to_str()}


def stop_token_ids(tokenizer: Tokenizer) -> set[int]:
    """Tokens that end an assistant turn: end-of-text, the ones the model's files name (GGUF eot/eom,
    generation_config.json's eos list), and the families' end-of-turn tokens its vocabulary has as special."""
    named = [*tokenizer.end_of_turn_tokens, *(t for t in END_OF_TURN_TOKENS if t in tokenizer.special_tokens)]
    ids = {tokenizer.eos_id, *(tokenizer.token_to_id(token) for token in named)}
    return {i for i in ids if i is not None}


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes byte b as one printable character; this maps each back to its byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    characters = {chr(b): b for b in printable}
    characters.update({chr(256 + index): b for index, b in enumerate(shifted)})
    return characters


def token_bytes(tokenizer: Tokenizer) -> tuple[list[bytes], list[int]]:
    """The bytes each token id stands for in the output, and the ids of special tokens (whose bytes are
    their names; a grammar never produces them as text). Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2),
    SentencePiece-style BPE ("▁" for a space, <0xNN> byte fallback: Llama 2, Gemma, Mistral) and char
    tokenizers (special tokens, then 256 byte tokens, then characters)."""
    special_names = set(tokenizer.special_tokens)
    if isinstance(tokenizer, CharTokenizer):
        pieces = [token.encode() for token in tokenizer.special_tokens] + [bytes([b]) for b in range(256)]
        pieces += [char.encode() for char in tokenizer.chars]
        return pieces, list(range(len(tokenizer.special_tokens)))
    if not isinstance(tokenizer, BPETokenizer):
        raise LmforgeError(f"the bytes of {type(tokenizer).__name__} tokens are not known")
    state = json.loads(tokenizer.hf.to_str())
    model, decoder = state["model"], state.get("decoder") or {}
    steps = decoder.get("decoders", [decoder])
    byte_level = any(step.get("type") == "ByteLevel" for step in steps)
    metaspace = any(
        step.get("type") == "Metaspace" or (step.get("type") == "Replace" and "▁" in json.dumps(step.get("pattern")))
        for step in steps
    )
    if model.get("type") != "BPE" or not (byte_level or metaspace or model.get("byte_fallback")):
        raise LmforgeError(
            "token bytes (which constrained decoding needs) are known for BPE tokenizers (byte-level, or "
            "SentencePiece-style with byte fallback) "
            f"and char tokenizers; this one is {model.get('type')} with decoder {decoder.get('type')}"
        )
    alphabet = _byte_level_alphabet() if byte_level else {}
    added = {token["id"]: token for token in state.get("added_tokens", [])}
    by_id = {index: token for token, index in model["vocab"].items()}
    pieces, special_ids = [], []
    for index in range(tokenizer.vocab_size):
        if index in added:
            text = added[index]["content"]
            if added[index]["special"] or text in special_names:
                special_ids.append(index)
            pieces.append(text.encode())
            continue
        token = by_id.get(index)
        if token is None or token in special_names or token == model.get("unk_token"):
            special_ids.append(index)  # a hole in the vocabulary, or <unk>: never text
            pieces.append((token or f"<[{index}]>").encode())
        elif byte_level:
            pieces.append(bytes(alphabet[char] for char in token))
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            pieces.append(bytes([int(token[3:5], 16)]))
        else:
            pieces.append(token.replace("▁", " ").encode())
    return pieces, special_ids


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved by `Tokenizer.save`."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"tokenizer file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LmforgeError(f"{path}: not a valid tokenizer JSON file ({error})") from None
    if not isinstance(document, dict) or "lmforge_tokenizer" not in document:
        raise LmforgeError(f"{path}: not an lmforge tokenizer file (missing 'lmforge_tokenizer' field)")
    kind = document.get("kind")
    if kind == "char":
        tokenizer: Tokenizer = CharTokenizer(document["chars"], document["special_tokens"])
    elif kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        hf_json = document["hf_tokenizer"]  # a string; older files nest it as a JSON object
        hf_json = hf_json if isinstance(hf_json, str) else json.dumps(hf_json)
        tokenizer = BPETokenizer(HFTokenizer.from_str(hf_json), document["special_tokens"])
    else:
        raise LmforgeError(f"{path}: unknown tokenizer kind {kind!r}; expected 'char' or 'bpe'")
    tokenizer._load_common(document)
    return tokenizer


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int | None = None) -> Tokenizer:
    """Train a 'char' or 'bpe' tokenizer on an iterable of texts."""
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bpe":
        if vocab_size is None:
            raise LmforgeError("a BPE tokenizer needs vocab_size")
        return BPETokenizer.train(texts, vocab_size)
    raise LmforgeError(f"unknown tokenizer kind {kind!r}; expected 'char', 'bpe' or a path to a tokenizer JSON file")
