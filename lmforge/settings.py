"""The settings of lmforge's verbs, as dataclasses with their defaults: model shapes and presets,
pretraining, sampling (and the terminal chat's), fine-tuning and recommendation.

They live apart from the code that uses them, in a module free of torch, because `--help` lists
them and `--key=value` overrides are checked against them before torch loads (3-9 s on a busy
CPU). Each module that uses one imports it from here; `lmforge serve`'s settings are in
`lmforge.serve`, also free of torch.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from lmforge.config import apply_values, merge
from lmforge.errors import LmforgeError

# Config fields that say what to do with the output folder, not how the run trains: a run's
# recorded settings leave them out (a config.json saying "resume": true describes no run).
FOLDER_ACTIONS = ("resume", "overwrite")

# --- the model: shape, family switches and named presets ---------------------------------


@dataclass
class ModelConfig:
    """Shape and family switches of a decoder-only Transformer."""

    vocab_size: int = 512
    block_size: int = 256  # longest context the model attends over
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # < n_heads means grouped-query attention
    d_model: int = 128
    d_mlp: int | None = None  # hidden width of the MLP; default 4 * d_model
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # "gelu" | "gelu_tanh" | "swiglu" | "geglu" (gate: GELU-tanh, Gemma)
    positions: str = "learned"  # "learned" | "rope"
    rope_theta: float = 10000.0
    bias: bool = True  # biases in Linear and LayerNorm layers
    tie_embeddings: bool = True
    dropout: float = 0.0
    causal: bool = True  # False: every position sees every other (encoders such as BERT)
    norm_position: str = "pre"  # "pre": x + f(norm(x)) (GPT-2, Llama); "post": norm(x + f(x)) (BERT)
    # Switches of the published families past GPT-2 and Llama (Mistral, Qwen2/3, Gemma 3, Phi-3).
    d_head: int | None = None  # width of one attention head; default d_model / n_heads (Qwen3 and Gemma 3 differ)
    qkv_bias: bool | None = None  # biases on the q, k and v projections (Qwen2); None: as `bias`
    qk_norm: bool = False  # RMSNorm over each head's q and k, before RoPE (Qwen3, Gemma 3)
    post_norms: bool = False  # norms on the attention and MLP outputs too, before each residual add (Gemma 3)
    scale_embeddings: bool = False  # token embeddings times sqrt(d_model) (Gemma)
    attention_scale: float | None = None  # scales q k^T; default 1/sqrt(head_dim); Gemma: query_pre_attn_scalar**-0.5
    logit_softcap: float | None = None  # final logits become cap * tanh(logits / cap) (Gemma 2, some Gemma 3)
    sliding_window: int | None = None  # a sliding layer's query sees itself and the sliding_window - 1 keys before it
    layer_types: list[str] | None = None  # per layer "sliding" | "full"; None: every layer sliding iff sliding_window
    rope_local_theta: float | None = None  # RoPE base of the sliding layers, which are never scaled (Gemma 3)
    # RoPE frequency scaling (of every layer, or with rope_local_theta of the full layers only), HF's form:
    # {"rope_type": "linear", "factor"}, {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}, {"rope_type": "yarn", "factor",
    # "original_max_position_embeddings", ...}, or from GGUF's rope_freqs {"rope_type": "factors", "factors": [...]}.
    rope_scaling: dict | None = None
    architecture: str | None = None  # published architecture the weights came from, which exports keep; None: derived

    def __post_init__(self) -> None:
        choices = {
            "norm_position": ("pre", "post"),
            "norm": ("layernorm", "rmsnorm"),
            "mlp": ("gelu", "gelu_tanh", "swiglu", "geglu"),
            "positions": ("learned", "rope"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name}={getattr(self, name)!r}: expected one of {allowed}")
        for name in ("vocab_size", "block_size", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_mlp"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"model.{name}={value}: must be at least 1")
        for name in ("d_head", "sliding_window"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"model.{name}={value}: must be at least 1")
        for name in ("attention_scale", "logit_softcap", "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"model.{name}={value}: must be positive")
        if self.d_head is None and self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be even for rope")
        if self.layer_types is not None:
            if self.sliding_window is None:
                raise ValueError("model.layer_types needs model.sliding_window (the sliding layers' window)")
            if len(self.layer_types) != self.n_layers or not set(self.layer_types) <= {"sliding", "full"}:
                raise ValueError(
                    f"model.layer_types={self.layer_types}: expected n_layers={self.n_layers} of 'sliding' | 'full'"
                )
        if self.rope_scaling is not None:
            kinds = ("linear", "llama3", "yarn", "factors")
            if not isinstance(self.rope_scaling, dict) or self.rope_scaling.get("rope_type") not in kinds:
                raise ValueError(f"model.rope_scaling={self.rope_scaling}: expected a rope_type of {kinds}")

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` attends over a sliding window (else over every earlier position)."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding"

    @property
    def kv_heads(self) -> int:
        """Key/value heads in use: n_kv_heads, or n_heads when unset (plain multi-head attention)."""
        return self.n_kv_heads or self.n_heads

    @property
    def mlp_hidden(self) -> int:
        """MLP hidden width in use: d_mlp, or 4 * d_model when unset."""
        return self.d_mlp or 4 * self.d_model

    @property
    def family(self) -> str | None:
        """The published architecture whose files can express this model (what the export formats write):
        `architecture` where it fits the switches, else the first of FAMILIES that does; None if none does."""
        if self.architecture in FAMILIES and self._fits(self.architecture):
            return self.architecture
        return next((family for family in FAMILIES if self._fits(family)), None)

    def _fits(self, family: str) -> bool:
        if not self.causal or self.norm_position != "pre":
            return False
        if family == "gpt2":  # no grouped-query attention: its formats give k and v as many heads as q
            gpt2_like = (self.norm, self.positions, self.bias) == ("layernorm", "learned", True)
            plain = self.d_head is None and self.qkv_bias in (None, True) and self.sliding_window is None
            return (
                gpt2_like
                and plain
                and self.mlp in ("gelu", "gelu_tanh")
                and self.kv_heads == self.n_heads
                and not (
                    self.qk_norm
                    or self.post_norms
                    or self.scale_embeddings
                    or self.attention_scale
                    or self.logit_softcap
                )
            )
        if (self.norm, self.positions, self.bias) != ("rmsnorm", "rope", False):
            return False
        if family == "gemma3":
            return (
                self.mlp == "geglu" and self.qk_norm and self.post_norms and self.scale_embeddings and not self.qkv_bias
            )
        all_sliding = self.sliding_window is not None and self.layer_types is None
        llama_like = self.mlp == "swiglu" and not (
            self.post_norms or self.scale_embeddings or self.attention_scale or self.logit_softcap
        )
        llama_like = llama_like and self.rope_local_theta is None
        if family in ("llama", "mistral", "phi3"):
            window_fits = self.sliding_window is None or (family != "llama" and all_sliding)
            return llama_like and window_fits and not self.qk_norm and not self.qkv_bias
        if family == "qwen2":
            return llama_like and not self.qk_norm
        return family == "qwen3" and llama_like and self.qk_norm and not self.qkv_bias

    def require_family(self, what: str) -> str:
        if self.family is None and self.norm == "layernorm" and self.positions == "learned" and self.bias:
            raise ValueError(
                f"{what}: the GPT-2 family has no grouped-query attention, and this model has n_kv_heads="
                f"{self.n_kv_heads} < n_heads={self.n_heads}; no HF or GGUF reader would load it. Train it with "
                f"n_kv_heads unset, or as the Llama family (norm=rmsnorm, mlp=swiglu, positions=rope, bias=false)"
            )
        if self.family is None:
            raise ValueError(
                f"{what} supports the published families {', '.join(FAMILIES)} (the Llama family: rmsnorm, swiglu, "
                f"rope, no bias; GPT-2: layernorm, gelu, learned positions, bias); this model has norm={self.norm}, "
                f"mlp={self.mlp}, positions={self.positions}, bias={self.bias}, qk_norm={self.qk_norm}, "
                f"post_norms={self.post_norms}, sliding_window={self.sliding_window}"
            )
        return self.family

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)


# The published architectures `ModelConfig.family` recognises, in the order it tries them on a config
# that names none: the plainest that expresses the switches first.
FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")

# The switches that make a ModelConfig the Llama family (its presets, and models built in code or tests).
LLAMA_SWITCHES = dict(norm="rmsnorm", mlp="swiglu", positions="rope", bias=False)

PRESETS: dict[str, ModelConfig] = {
    # ~50k parameters: unit tests and smoke runs.
    "tiny": ModelConfig(
        vocab_size=512, block_size=32, n_layers=2, n_heads=2, d_model=32, n_kv_heads=1, **LLAMA_SWITCHES
    ),
    # nanoGPT's CPU recipe (shakespeare_char with its CPU overrides) as a GPT-2 family model. nanoGPT
    # runs it without biases (model.bias=false here), which the GPT-2 export formats cannot express.
    "nanogpt-cpu": ModelConfig(vocab_size=65, block_size=64, n_layers=4, n_heads=4, d_model=128),
    # What `lmforge quickstart` trains: Llama family, sized for a few minutes on 2 CPU cores.
    "quickstart": ModelConfig(
        vocab_size=512, block_size=128, n_layers=4, n_heads=4, d_model=192, d_mlp=512, norm_eps=1e-6, **LLAMA_SWITCHES
    ),
    "gpt2-124m": ModelConfig(vocab_size=50257, block_size=1024, n_layers=12, n_heads=12, d_model=768, mlp="gelu_tanh"),
    "smollm2-135m": ModelConfig(
        vocab_size=49152,
        block_size=8192,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        d_model=576,
        d_mlp=1536,
        rope_theta=100000.0,
        norm_eps=1e-5,
        **LLAMA_SWITCHES,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A copy of the named preset with `overrides` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# --- pretraining -------------------------------------------------------------------------


PARALLEL_MODES = ("ddp", "fsdp", "hsdp")


def check_parallel_settings(config) -> None:
    """The keys `TrainConfig` and `Parallelism` (and the fine-tunes inheriting it) share: same names, same flags."""
    if config.parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel={config.parallel!r}: expected one of {PARALLEL_MODES}")
    if config.hsdp_shard_processes < 0:
        raise ValueError(
            f"hsdp_shard_processes must be >= 0 (0: one node's processes), got {config.hsdp_shard_processes}"
        )


@dataclass
class Parallelism:
    """How the processes of a torchrun job share a model that `fit` trains (`training.fit.compile`). The
    fine-tunes' configs (SFT, classify, vision-chat) inherit these keys, so their CLIs take them too."""

    # Under torchrun, as TrainConfig's: ddp keeps a whole model on every process; fsdp/hsdp shard it
    # (the training state is then sharded too, resumable on any number of processes).
    parallel: str = "ddp"  # ddp | fsdp | hsdp
    hsdp_shard_processes: int = 0  # hsdp: processes one copy of the model is sharded over (0: one node's)
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory

    def __post_init__(self) -> None:
        check_parallel_settings(self)

    def parallelism(self) -> Parallelism:
        """These keys alone, without the rest of a config that inherits them."""
        return Parallelism(self.parallel, self.hsdp_shard_processes, self.activation_checkpointing)


@dataclass
class TrainConfig:
    """Everything a pretraining run needs; YAML/JSON files and --key=value map onto it."""

    data_dir: str = "data/shakespeare"
    out_dir: str = "runs/default"
    preset: str = "quickstart"  # model preset; `model.*` keys override its fields
    model: ModelConfig = field(default_factory=lambda: preset("quickstart"))
    batch_size: int = 16  # sequences per micro-step per process
    grad_accum_steps: int = 1
    max_steps: int = 2000
    learning_rate: float = 2e-3
    min_learning_rate: float = 2e-4
    warmup_steps: int | None = None  # unset: a tenth of max_steps, at most 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250
    eval_tokens: int = 65536  # validation tokens per evaluation
    log_interval: int = 10
    checkpoint_interval: int = 500  # also written at the end and after each evaluation
    keep_checkpoints: int = 2
    seed: int = 1337
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Under torchrun: ddp keeps a whole model on every process; fsdp shards parameters, gradients and
    # optimizer state across the processes; hsdp shards within groups of hsdp_shard_processes and
    # replicates across them. fsdp/hsdp write sharded checkpoints any number of processes can resume.
    parallel: str = "ddp"  # ddp | fsdp | hsdp
    hsdp_shard_processes: int = 0  # hsdp: processes one copy of the model is sharded over (0: one node's)
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory
    resume: bool = False  # continue the run in out_dir, or start it there if it has no checkpoint yet
    overwrite: bool = False  # out_dir holds a run: move it into out_dir/previous-<date>-<time>/ first
    peak_flops: float | None = None  # for MFU; measured with a matmul when unset
    progress: str = "auto"  # auto (bar on a terminal) | bar | plain | none
    plot: bool = True  # write loss_curve.png at the end

    def __post_init__(self) -> None:
        check_parallel_settings(self)


def train_config_from(values: dict) -> TrainConfig:
    """A TrainConfig from nested values: the model preset first, then everything else. Resuming,
    the run's recorded settings (out_dir/config.json) fill in what `values` leave unset."""
    config = _config_from_values(values)
    if config.resume:
        recorded = recorded_settings(Path(config.out_dir))
        if recorded is not None:
            config = _config_from_values(merge(recorded, values))
    return config


def _config_from_values(values: dict) -> TrainConfig:
    preset_name = str(values.get("preset", TrainConfig.preset))
    try:
        config = TrainConfig(preset=preset_name, model=preset(preset_name))
    except ValueError as error:
        raise LmforgeError(str(error)) from None
    return apply_values(config, values)


def recorded_settings(out_dir: Path) -> dict | None:
    """The settings a run recorded in out_dir/config.json (None when there is none), without the
    folder actions older versions recorded with them."""
    path = out_dir / "config.json"
    if not path.exists():
        return None
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise LmforgeError(f"{path}: unreadable ({error}); resuming reads the run's settings from it") from None
    if not isinstance(recorded, dict):
        raise LmforgeError(f"{path}: not a mapping of settings; resuming reads the run's settings from it")
    return {key: value for key, value in recorded.items() if key not in FOLDER_ACTIONS}


# --- sampling ----------------------------------------------------------------------------


@dataclass
class SamplingConfig:
    """How to pick each next token. temperature=0 means greedy."""

    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # Constrained decoding (`lmforge.inference.constrained`): the output is JSON valid against json_schema
    # ({"type": "object"}: any JSON object), or text matching grammar, a Lark grammar in llguidance's dialect
    # (https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md; `lark_json(schema)` embeds a schema).
    json_schema: dict | None = None
    grammar: str | None = None
    # token id -> added to its logit before anything else (OpenAI's logit_bias: -100 all but bans a token,
    # +100 all but forces it); the logprobs a server reports are of these biased logits
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Checked where the values arrive (--key=value, a config file, Python), not where they would
        # silently misbehave: top_p=2 keeps every token, a negative max_new_tokens generates nothing.
        problems = [
            f"{name} must be {rule}, got {value}"
            for name, value, rule, fine in [
                ("max_new_tokens", self.max_new_tokens, ">= 0", self.max_new_tokens >= 0),
                ("temperature", self.temperature, ">= 0 (0 is greedy)", self.temperature >= 0),
                ("top_k", self.top_k, ">= 1 or unset", self.top_k is None or self.top_k >= 1),
                ("top_p", self.top_p, "in (0, 1] or unset", self.top_p is None or 0 < self.top_p <= 1),
                ("repetition_penalty", self.repetition_penalty, "> 0 (1 is none)", self.repetition_penalty > 0),
                ("logit_bias", self.logit_bias, "token ids (>= 0) -> finite numbers", _valid_bias(self.logit_bias)),
            ]
            if not fine
        ]
        if problems:
            raise ValueError("; ".join(problems))
        self.constraint()  # a bad schema or grammar fails here, not at the first generated token

    @property
    def constrained(self) -> bool:
        """Whether json_schema or grammar constrains the output (`constraint()` compiles it: milliseconds)."""
        return self.json_schema is not None or self.grammar is not None

    def constraint(self) -> str | None:
        """The llguidance grammar that json_schema or grammar asks for (None: unconstrained); ValueError naming the
        field, with llguidance's reason, for a schema or grammar it cannot compile."""
        if not self.constrained:
            return None
        if self.json_schema is not None and self.grammar is not None:
            raise ValueError("give json_schema or grammar, not both (a grammar can embed a schema with %json{...})")
        if self.json_schema is not None:
            if not isinstance(self.json_schema, dict):
                raise ValueError(f"json_schema must be a JSON Schema object, got {type(self.json_schema).__name__}")
            try:
                schema_text = json.dumps(self.json_schema, sort_keys=True)
            except (TypeError, ValueError) as error:
                raise ValueError(f"json_schema is not JSON: {error}") from None
            return _compiled_grammar("json_schema", schema_text)
        if not isinstance(self.grammar, str) or not self.grammar.strip():
            raise ValueError("grammar must be the text of a Lark grammar")
        return _compiled_grammar("grammar", self.grammar)


# A served request's schema is checked when the request arrives, again in its SamplingConfig and once more for
# its matcher; validating costs 1-5 ms a time (llguidance compiles it), so each distinct schema or grammar is
# compiled once. Failures raise and are not kept.
@functools.lru_cache(maxsize=256)
def _compiled_grammar(field_name: str, text: str) -> str:
    import llguidance  # only here: ~0.1 s, and only for a constrained config

    if field_name == "json_schema":
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.loads(text), defaults=JSON_LAYOUT)
    else:
        grammar = llguidance.LLMatcher.grammar_from_lark(text)
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise ValueError(f"{field_name}: llguidance cannot use it: {problem.strip()}")
    return grammar


# How constrained JSON is written, as json.dumps(ensure_ascii=False) writes it: its separators and no other
# whitespace, and characters as themselves, with no \uXXXX escapes. With llguidance's defaults (any whitespace
# between tokens; \u escapes of control characters) SmolLM2 at temperature 1 filled replies with blank lines
# or wrote "\u00028" runs, a 30-character string taking ~100 tokens, until max_new_tokens cut the JSON off.
JSON_LAYOUT = {
    "item_separator": ", ",
    "key_separator": ": ",
    "whitespace_flexible": False,
    "json_allowed_escapes": 'nrbtf"\\',
}


def lark_json(schema: dict) -> str:
    """`schema` as a Lark grammar's `%json {...}` (e.g. the arguments of a tool call in SamplingConfig.grammar), laid
    out as json_schema output is: a bare %json would allow any whitespace between its tokens."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_LAYOUT})


def _valid_bias(bias) -> bool:
    return isinstance(bias, dict) and all(
        isinstance(token, int) and token >= 0 and isinstance(value, (int, float)) and math.isfinite(value)
        for token, value in bias.items()
    )


def fallback_sampling(chat_model: bool) -> SamplingConfig:
    """lmforge's documented defaults for a model whose files name no sampling settings.

    A chat model (one with a chat template) answers at a low temperature with nucleus sampling and a
    mild repetition penalty: at temperature 1.0 SmolLM2-135M-Instruct answers "What is the capital of
    France?" with "Rim (V∞55) BugEurope…". A base model continues text with SamplingConfig's own values.
    """
    if chat_model:
        return SamplingConfig(max_new_tokens=512, temperature=0.2, top_p=0.9, repetition_penalty=1.1)
    return SamplingConfig()


def describe_sampling(sampling: SamplingConfig) -> str:
    """The settings in words: 'temperature 0.2, top_p 0.9, repetition_penalty 1.1, max_new_tokens 512'."""
    parts = [f"temperature {sampling.temperature:g}"]
    if sampling.top_k is not None:
        parts.append(f"top_k {sampling.top_k}")
    if sampling.top_p is not None and sampling.top_p < 1.0:
        parts.append(f"top_p {sampling.top_p:g}")
    if sampling.repetition_penalty != 1.0:
        parts.append(f"repetition_penalty {sampling.repetition_penalty:g}")
    return ", ".join(parts + [f"max_new_tokens {sampling.max_new_tokens}"])


# --- fine-tuning -------------------------------------------------------------------------


@dataclass
class ClassifyConfig(Parallelism):
    """`lmforge finetune --task classify`: what to fine-tune, on which table, and how."""

    data: str = ""  # CSV/TSV/JSONL/Parquet with a text and a label column
    model: str = "all-minilm-l6-v2"  # a built-in encoder, or any model `lmforge.formats.loading.load` reads
    out: str = "runs/classify"
    validation: str | None = None
    validation_split: float = 0.1  # held out of `data` when no `validation` file is given
    text_field: str = "text"
    label_field: str = "label"
    pooling: str | None = None  # default: "mean" for encoders, "last" for decoders
    dropout: float = 0.1  # on the pooled features, before the head
    max_tokens: int = 128
    epochs: int = 3
    batch_size: int = 16
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int | None = None  # unset: a tenth of the optimizer steps, at most 100
    accumulation_steps: int = 1
    patience: int = 2  # early stopping on validation loss
    balanced_class_weights: bool = False
    lora_rank: int = 0  # 0: every weight trains
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = field(default=("qkv", "out", "up", "down"))
    seed: int = 0
    overwrite: bool = False  # `out` holds a classifier: move it into out/previous-<date>-<time>/ first
    resume: bool = False  # continue the run in `out` from its training state (written as below and on Ctrl-C)
    checkpoint_interval: int = 50  # optimizer steps between training states (also at each epoch's end)
    device: str = "cpu"  # cpu | auto | cuda | cuda:N (under torchrun: cuda is each process's LOCAL_RANK GPU)


@dataclass
class SFTConfig(Parallelism):
    """`lmforge finetune --task sft`: which model, which chats, and how to train on them."""

    data: str = ""  # chat JSONL, one {"messages": [...]} a line
    model: str = "smollm2-135m-instruct"
    out: str = "runs/sft"
    validation: str | None = None
    max_tokens: int = 512  # tokens per training row
    packing: bool = True
    epochs: int = 2
    batch_size: int = 4
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # unset: a tenth of the optimizer steps, at most 100
    accumulation_steps: int = 1
    clip_grad_norm: float = 1.0
    lora_rank: int = 8  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = field(default=("qkv", "out", "up", "down"))
    merge: bool = False  # with LoRA: also write the merged full model to out/model
    seed: int = 0
    overwrite: bool = False  # `out` holds a run: move it into out/previous-<date>-<time>/ first
    resume: bool = False  # continue the run in `out` from its training state (written as below and on Ctrl-C)
    checkpoint_interval: int = 50  # optimizer steps between training states (also at each epoch's end)
    device: str = "cpu"  # cpu | auto | cuda | cuda:N (under torchrun: cuda is each process's LOCAL_RANK GPU)


@dataclass
class VisionChatConfig(Parallelism):
    """`lmforge finetune --task vision-chat`: a LLaVA-style model (`lmforge.apps.vlm`) on the generated
    digit and shape-scene chats (`lmforge.apps.scenes`). The image encoder is trained first on the
    images' labels; then the projector and LoRA adapters train on the chats, the base frozen."""

    model: str = "smollm2-135m-instruct"  # the language model
    out: str = "runs/vision-chat"
    train_chats: int = 600  # generated chats, a third each of digit, count and describe questions
    validation_chats: int = 60  # from the held-out images; their loss is logged each epoch
    epochs: int = 1
    batch_size: int = 8
    learning_rate: float = 1e-3  # projector and adapters
    warmup_steps: int | None = None  # unset: a tenth of the optimizer steps, at most 100
    clip_grad_norm: float = 1.0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = field(default=("qkv", "out", "up", "down"))
    encoder_images: int = 1500  # generated scenes (beside the digits' training split) the encoder learns from
    encoder_epochs: int = 12
    text_only: bool = False  # the baseline that cannot see: the same chats with the image left out
    seed: int = 0
    overwrite: bool = False  # `out` holds a run: move it into out/previous-<date>-<time>/ first
    resume: bool = False  # continue the run in `out` from its training state (written as below and on Ctrl-C)
    checkpoint_interval: int = 20  # optimizer steps between training states (also at each epoch's end)
    device: str = "cpu"  # cpu | auto | cuda | cuda:N (under torchrun: cuda is each process's LOCAL_RANK GPU)


# --- recommendation ----------------------------------------------------------------------


@dataclass
class RecommendConfig:
    """`lmforge recommend train`: which model, on which log, and how to train it."""

    data: str = ""  # CSV user,item,timestamp or a MovieLens ratings file; "synthetic" for the generator
    out: str = "runs/recommend"
    model: str = "sasrec"  # "sasrec" | "mf"
    max_length: int = 50  # items of history the sequence model reads
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 3e-3
    min_items: int = 3
    seed: int = 0


# --- text-to-image -----------------------------------------------------------------------


@dataclass
class DiffusionConfig:
    """A text-to-image diffusion model (`lmforge.apps.diffusion`) and how it trains; saved with the model."""

    image_size: int = 8  # pixels per side (the digits are 8x8)
    channels: int = 1  # 1 grey, 3 RGB
    denoiser: str = "unet"  # "unet" | "dit"
    width: int = 32  # U-Net channels at full resolution (doubling per level); DiT d_model
    levels: int = 2  # U-Net resolutions (image_size must halve levels - 1 times)
    n_layers: int = 4  # DiT blocks
    n_heads: int = 4  # DiT attention heads
    patch_size: int = 2  # DiT pixels per patch side
    text_model: str = "all-minilm-l6-v2"  # the sentence embedding captions are read through
    text_dimensions: int = 384  # its vectors' size
    timesteps: int = 1000  # steps of the (cosine) noise schedule
    condition_dropout: float = 0.15  # share of examples trained without their caption (classifier-free guidance)
    guidance_scale: float = 5.0  # sampling default: 0 unconditional, 1 plain conditional, > 1 guided
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.995  # 0: no moving average of the weights
    checkpoint_interval: int = 200  # optimizer steps between training states (also at each epoch's end)
    seed: int = 0

    @property
    def condition_dimensions(self) -> int:
        """The step + caption condition vector's size."""
        return 4 * self.width


@dataclass
class GANConfig:
    """A text-conditioned GAN (`lmforge.apps.gan`), the diffusion model's baseline, and how it trains."""

    image_size: int = 8  # pixels per side, a power of two ≥ 8: the generator starts at 4x4 and doubles
    channels: int = 1  # 1 grey, 3 RGB
    noise_dim: int = 64  # the generator's random input
    text_model: str = "all-minilm-l6-v2"  # the sentence embedding captions are read through
    text_dimensions: int = 384  # its vectors' size
    text_projection_dim: int = 64  # the caption's part of the generator's input
    width: int = 32  # the generator's last and the discriminator's first convolution's channels
    steps: int = 2000  # generator (and discriminator) updates
    batch_size: int = 64
    generator_lr: float = 2e-4
    discriminator_lr: float = 2e-4
    beta1: float = 0.5  # Adam's momentum; DCGAN's 0.5, as 0.9 made their training oscillate
    beta2: float = 0.999
    mismatch_weight: float = 0.5  # share of the discriminator's "fake" term given to real images, wrong captions
    ema_decay: float = 0.999  # the sampled generator is this moving average of the trained one's weights
    checkpoint_interval: int = 500  # steps between training states (also at the end)
    seed: int = 0

    def __post_init__(self):
        if self.image_size < 8 or self.image_size & (self.image_size - 1):
            raise ValueError(f"GAN image_size must be a power of two ≥ 8, got {self.image_size}")

    @property
    def upsampling_stages(self) -> int:
        """Doublings from the generator's 4x4 start to image_size."""
        return int(math.log2(self.image_size // 4))
