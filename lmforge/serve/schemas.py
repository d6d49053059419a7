"""Request and response bodies of the OpenAI-compatible API (pydantic), with their limits."""

from __future__ import annotations

import json
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

MAX_N = 8  # choices per request
MAX_STOP = 4  # stop strings, as OpenAI allows
MAX_BATCH_INPUTS = 256  # prompts per /v1/completions request
# inputs per /v1/embeddings request, as OpenAI allows (LangChain's OpenAIEmbeddings sends 1,000 at once);
# their tokens are bounded by ServeLimits.max_embedding_tokens_per_request
MAX_EMBEDDING_INPUTS = 2048
MAX_TOOLS = 128  # function definitions per request, as OpenAI allows
MAX_TOOLS_JSON_CHARS = 100_000  # the definitions written out: they go into every prompt of the request
MAX_TOP_LOGPROBS = 20  # most likely alternatives per token, as OpenAI's chat allows (its completions: 5)


class FieldError(ValueError):
    """A request field at fault, answered as a 400 with the field as OpenAI's `param`; `field` is its dotted path."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class InvalidText(FieldError):
    """A string in the request that is not valid Unicode."""

    def __init__(self, field: str, position: int):
        super().__init__(field, f"{field}: a lone UTF-16 surrogate at character {position}; send valid Unicode text")


def _check_unicode(value, path: str) -> None:
    # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer can take.
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise InvalidText(path or "body", error.start) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, f"{path}.{key!r}" if path else repr(key))
            _check_unicode(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_unicode(item, f"{path}.{index}" if path else str(index))


class _Request(BaseModel):
    """The field policy: a request field is implemented (declared on its model), accepted as a no-op (listed in
    the model's NO_OP_FIELDS), or refused with a 400 naming it ("unsupported field"): a client that sends a field
    trusts its effect, so none is dropped silently."""

    model_config = ConfigDict(extra="forbid")
    # Changing nothing here: `user` (an end-user id for the provider's abuse monitoring), `store` and `metadata`
    # (OpenAI keeping completions for its dashboard), `service_tier` (OpenAI's capacity tier).
    NO_OP_FIELDS: ClassVar[frozenset[str]] = frozenset({"user", "store", "metadata", "service_tier"})

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode_and_no_ops_dropped(cls, values):
        _check_unicode(values, "")
        if isinstance(values, dict):
            values = {name: value for name, value in values.items() if name not in cls.NO_OP_FIELDS}
        return values


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str  # a base64 data: URL (`lmforge.serve.images`); remote URLs are refused
    # OpenAI's resolution hint, accepted and changing nothing: a vision-language model here reads every image at
    # its encoder's one input size, in the same number of image tokens
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(BaseModel):
    """A call the assistant made: in a response, and in the history a client sends back (other keys
    there, such as the `index` of streamed calls that clients keep when they join the pieces, are ignored)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a message field this server does not read is refused, not dropped
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)  # an assistant's
    tool_call_id: str | None = None  # a tool result's: the call it answers

    def text(self) -> str:
        """The message's text (its text parts joined; image parts have none)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(isinstance(part, ImagePart) for part in self.content)


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema: the schema the reply follows (OpenAI's structured outputs)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    json_schema: dict = Field(default_factory=dict, alias="schema")  # "schema" shadows a BaseModel attribute
    strict: bool | None = None  # decoding is constrained either way: the reply always follows the schema


class ResponseFormat(BaseModel):
    """What the reply is: free text (the default), any JSON object, or JSON following `json_schema`."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs json_schema: {"name": ..., "schema": {...}}')
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f'json_schema goes with type "json_schema", not {self.type!r}')
        return self

    def schema_for_decoding(self) -> dict | None:
        """The JSON Schema the reply is constrained to (None: free text)."""
        if self.type == "json_object":
            return {"type": "object"}
        return self.json_schema.json_schema if self.type == "json_schema" else None


class StreamOptions(_Request):
    include_usage: bool = False  # a last chunk with the usage and no choices


class _Sampling(_Request):
    # A sampling field left out (None) takes the served model's default (`lmforge.formats.loading.sampling_defaults`).
    # top_k and repetition_penalty are not OpenAI's; vLLM and llama.cpp's server take them under these names.
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # 0 or -1: off
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string: JSON keys are) -> -100..100

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias):
        for key, value in (bias or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) <= 12):
                raise ValueError(f"keys are token ids (whole numbers as strings), not {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"token {key}: a bias is from -100 to 100, not {value:g}")
        return bias

    def token_bias(self) -> dict[int, float]:
        return {int(key): value for key, value in (self.logit_bias or {}).items()}

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(len(s) > 200 for s in stops):
            raise ValueError("a stop sequence may be at most 200 characters")
        return stops


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")  # what a client sets here, it trusts to take effect
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule; also keeps names plain in grammars
    description: str | None = None
    parameters: dict | None = None  # a JSON Schema of the arguments object
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    parallel_tool_calls: bool = True

    @field_validator("tools")
    @classmethod
    def _bounded_tools(cls, tools):
        if tools and len(json.dumps([tool.model_dump(exclude_none=True) for tool in tools])) > MAX_TOOLS_JSON_CHARS:
            raise ValueError(f"the tool definitions may take at most {MAX_TOOLS_JSON_CHARS} characters as JSON")
        return tools

    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs=true")
        return self

    def generated_scores(self) -> int | None:
        """Alternatives to report per generated token; None when its logprobs are not asked for."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def prompt_scores(self) -> int | None:
        return None


class CompletionRequest(_Sampling):
    # text, texts, token ids, or lists of token ids (taken as they are: no BOS is added)
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(...)
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: the prompt's scores alone
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # score tokens, with this many alternatives
    echo: bool = False  # the prompt comes back before the completion (and with logprobs, its tokens' scores)
    suffix: str | None = None  # refused: text after an insertion point needs a fill-in-the-middle model

    @field_validator("prompt")
    @classmethod
    def _bounded_prompts(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return prompt  # one prompt of token ids
        if isinstance(prompt, list) and not 1 <= len(prompt) <= MAX_BATCH_INPUTS:
            raise ValueError(f"give 1 to {MAX_BATCH_INPUTS} prompts")
        return prompt

    @model_validator(mode="after")
    def _consistent(self):
        if self.suffix:
            raise FieldError("suffix", "suffix is not supported: this server only continues a prompt at its end")
        if self.max_tokens == 0 and not self.echo:
            raise FieldError("max_tokens", "max_tokens=0 needs echo=true (it returns the prompt and nothing more)")
        return self

    def generated_scores(self) -> int | None:
        """Alternatives to report per generated token; None when its logprobs are not asked for."""
        return self.logprobs

    def prompt_scores(self) -> int | None:
        """Alternatives to report per prompt token (echo with logprobs); None when not asked for."""
        return self.logprobs if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)


class EmbeddingRequest(_Request):
    model: str | None = None
    # texts, or texts as token ids of the embedding model's own tokenizer (without [CLS]/[SEP]; see `token_ids`)
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)  # keep the first N components, then L2-normalise again

    @field_validator("input")
    @classmethod
    def _bounded_inputs(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], int):
            return value  # one text as token ids
        items = [value] if isinstance(value, str) else value
        if not 1 <= len(items) <= MAX_EMBEDDING_INPUTS:
            raise ValueError(f"give 1 to {MAX_EMBEDDING_INPUTS} inputs")
        if any(not item for item in items):
            raise ValueError("inputs must be non-empty strings or token-id lists")
        return value

    def token_ids(self) -> list[list[int]] | None:
        """The inputs as lists of token ids, or None when they are texts."""
        if isinstance(self.input, str) or isinstance(self.input[0], str):
            return None
        return [self.input] if isinstance(self.input[0], int) else self.input

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class TokenizeRequest(_Request):
    """vLLM's /tokenize, which lm-evaluation-harness's `local-completions` finds and uses as its tokenizer."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # the BOS/EOS the model's files ask for around a text


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[StrictInt] = Field(max_length=1_000_000)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's UTF-8 bytes (a token that splits a character shows U+FFFD's)


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A piece of a streamed call, as OpenAI streams them: the first has the id, type and name
    (arguments ""), the next ones pieces of the arguments; `index` says which call of the reply."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: one entry per token. With echo, the prompt's first token has no score (None)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]  # the `logprobs` most likely tokens, and the chosen one
    text_offset: list[int]  # where each token starts in the choice's text


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class SamplingDefaultsCard(BaseModel):
    """What a request that leaves these fields out gets, and where the values come from."""

    temperature: float
    top_p: float | None
    top_k: int | None
    repetition_penalty: float
    max_tokens: int
    source: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmforge"
    # lmforge's own fields: the routes the model answers, its context and (chat models) its sampling defaults
    capabilities: list[Literal["chat", "completions", "embeddings", "vision"]]  # vision: chat reads image_url parts
    context_tokens: int | None = None
    sampling_defaults: SamplingDefaultsCard | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
