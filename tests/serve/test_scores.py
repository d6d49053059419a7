"""Scores and inputs on `lmforge serve`: logprobs (chat and completions, echo), token-id prompts, logit_bias,
GET /v1/models/{id}, the tokenizer routes, and the field policy (no request field is dropped silently);
lm-evaluation-harness's `local-completions` scoring a multiple-choice task against a live server."""

import json

import pytest
import torch

from lmforge.inference.chat import encode_chat
from lmforge.serve.app import ServedModels, ServeLimits, create_app
from lmforge.serve.scheduler import Scheduler
from lmforge.serve.schemas import MAX_TOP_LOGPROBS, ChatCompletionRequest, CompletionRequest, EmbeddingRequest

from .test_serve import API_KEY, CONTEXT, LiveServer, raw, tiny_chat_model

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture(scope="module")
def served():
    model, tokenizer = tiny_chat_model()
    scheduler = Scheduler(model, tokenizer, max_batch=4, max_context=CONTEXT)
    server = LiveServer(create_app(ServedModels("tiny", scheduler), ServeLimits(max_tokens=160, api_key=API_KEY)))
    yield server, model, tokenizer
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served[0].port}/v1", api_key=API_KEY, max_retries=0)


def log_softmax_of(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab): row i is the model's log-distribution of the token after ids[: i + 1]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0][0], -1)


def post(served, path: str, body: dict) -> tuple[int, dict]:
    status, data = raw(served[0].port, "POST", path, json.dumps(body).encode())
    return status, json.loads(data)


def test_chat_logprobs_are_the_model_log_softmax_with_top_alternatives(served, client):
    _, model, tokenizer = served
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 8
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    prompt = encode_chat(tokenizer, MESSAGES)
    generated = [tokenizer.token_to_id(entry.token) for entry in content]
    reference = log_softmax_of(model, prompt + generated)[len(prompt) - 1 :]
    for position, entry in enumerate(content):
        assert entry.logprob == pytest.approx(float(reference[position, generated[position]]), abs=1e-4)
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
        values = [alternative.logprob for alternative in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx(reference[position].topk(3).values.tolist(), abs=1e-4)
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs_give_a_tokens_own_bytes_where_it_splits_a_character(served, client):
    _, _, tokenizer = served
    first_byte_of_e_acute = len(tokenizer.special_tokens) + 0xC3  # the char tokenizer's byte tokens follow its specials
    reply = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=1,
        temperature=0,
        logprobs=True,
        logit_bias={str(first_byte_of_e_acute): 100},
    )
    entry = reply.choices[0].logprobs.content[0]
    assert entry.bytes == [0xC3]  # "é" is C3 A9: the token holds its first byte only
    assert entry.token == "\ufffd"


def test_streamed_chat_chunks_carry_the_logprobs_of_their_own_tokens(served, client):
    whole = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2, stream=True
        )
    )
    streamed = []
    for chunk in chunks:
        choice = chunk.choices[0]
        if choice.delta.content:
            assert "".join(entry.token for entry in choice.logprobs.content) == choice.delta.content
            streamed += choice.logprobs.content
    content = whole.choices[0].logprobs.content
    assert [entry.token for entry in streamed] == [entry.token for entry in content]
    assert [entry.logprob for entry in streamed] == pytest.approx([entry.logprob for entry in content], abs=1e-5)


def test_top_logprobs_are_bounded_and_need_logprobs(served, client):
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, logprobs=True, top_logprobs=21)
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs=true"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="tiny", prompt="ab", logprobs=MAX_TOP_LOGPROBS + 1)


def test_completion_echo_with_logprobs_scores_the_prompt(served, client):
    """What lm-evaluation-harness's loglikelihood asks: the prompt back with each token's log-probability
    given the ones before it (none for the first), with max_tokens 0 (the prompt alone) or 1."""
    _, model, tokenizer = served
    prompt = "the cat sat on a mat"
    ids = tokenizer.encode(prompt)
    reference = log_softmax_of(model, ids)
    only = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = only.choices[0]
    assert choice.text == prompt and only.usage.completion_tokens == 0
    scores = choice.logprobs
    assert scores.tokens == list(prompt) and scores.text_offset == list(range(len(prompt)))
    assert scores.token_logprobs[0] is None and scores.top_logprobs[0] is None
    for position in range(1, len(ids)):
        expected = float(reference[position - 1, ids[position]])
        assert scores.token_logprobs[position] == pytest.approx(expected, abs=1e-4)
        top = scores.top_logprobs[position]
        assert top[scores.tokens[position]] == pytest.approx(expected, abs=1e-4)  # the chosen token is always in
        best = tokenizer.decode([int(reference[position - 1].argmax())])
        assert top[best] == pytest.approx(float(reference[position - 1].max()), abs=1e-4)
    one = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0)
    extended = one.choices[0].logprobs
    assert one.choices[0].text.startswith(prompt) and len(extended.tokens) == len(ids) + 1
    assert extended.token_logprobs[:-1] == pytest.approx(scores.token_logprobs)
    next_token = tokenizer.token_to_id(extended.tokens[-1])
    assert next_token == int(reference[-1].argmax())
    assert extended.token_logprobs[-1] == pytest.approx(float(reference[-1].max()), abs=1e-4)
    with pytest.raises(openai.BadRequestError, match="max_tokens=0 needs echo=true"):
        client.completions.create(model="tiny", prompt=prompt, max_tokens=0)
    # lm-evaluation-harness with batch_size > 1: token-id prompts in one request, a choice each
    batch = client.completions.create(model="tiny", prompt=[ids, ids[:5]], max_tokens=0, echo=True, logprobs=1)
    assert [choice.logprobs.token_logprobs for choice in batch.choices] == [
        pytest.approx(scores.token_logprobs),
        pytest.approx(scores.token_logprobs[:5]),
    ]
    # streamed: the echoed prompt (with its scores) first, then the completion, as one non-streamed reply has them
    for logprobs in (None, 1):
        whole = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=3, echo=True, logprobs=logprobs, temperature=0
        )
        chunks = [
            chunk.choices[0]
            for chunk in client.completions.create(
                model="tiny", prompt=prompt, max_tokens=3, echo=True, logprobs=logprobs, temperature=0, stream=True
            )
        ]
        assert chunks[0].text == prompt and "".join(chunk.text for chunk in chunks) == whole.choices[0].text
        if logprobs:
            streamed = [chunk.logprobs for chunk in chunks if chunk.text]
            assert sum((scores.tokens for scores in streamed), []) == whole.choices[0].logprobs.tokens
            assert sum((scores.text_offset for scores in streamed), []) == whole.choices[0].logprobs.text_offset
            token_logprobs = sum((scores.token_logprobs for scores in streamed), [])
            assert token_logprobs == pytest.approx(whole.choices[0].logprobs.token_logprobs)


def test_completion_logprobs_without_echo_score_the_generated_tokens(served, client):
    _, model, tokenizer = served
    reply = client.completions.create(model="tiny", prompt="Once upon a", max_tokens=6, temperature=0, logprobs=0)
    scores = reply.choices[0].logprobs
    assert "".join(scores.tokens) == reply.choices[0].text and scores.text_offset == list(range(6))
    ids = tokenizer.encode("Once upon a") + [tokenizer.token_to_id(token) for token in scores.tokens]
    reference = log_softmax_of(model, ids)[-7:-1]
    assert scores.token_logprobs == pytest.approx(reference.max(-1).values.tolist(), abs=1e-4)
    streamed = client.completions.create(
        model="tiny", prompt="Once upon a", max_tokens=6, temperature=0, logprobs=0, stream=True
    )
    tokens, offsets = [], []
    for chunk in streamed:
        if chunk.choices and chunk.choices[0].text:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == scores.tokens and offsets == scores.text_offset


def test_prompts_as_token_ids_one_or_a_batch(served, client):
    _, _, tokenizer = served
    text = client.completions.create(model="tiny", prompt="Once upon a", max_tokens=6, temperature=0)
    ids = tokenizer.encode("Once upon a")
    one = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert one.choices[0].text == text.choices[0].text and one.usage.prompt_tokens == len(ids)
    batch = client.completions.create(model="tiny", prompt=[ids, ids[:4]], max_tokens=6, temperature=0)
    assert len(batch.choices) == 2 and batch.choices[0].text == text.choices[0].text
    with pytest.raises(openai.BadRequestError, match=r"prompt\[1\]\[2\]: token id 100000 is outside the vocab"):
        client.completions.create(model="tiny", prompt=[ids, [1, 2, 100000]], max_tokens=2)
    status, body = post(served, "/v1/completions", {"prompt": [1, -3], "max_tokens": 2})
    assert status == 400 and "prompt[1]: token id -3" in body["error"]["message"]


def test_logit_bias_forces_and_bans_tokens(served, client):
    _, _, tokenizer = served
    x = tokenizer.token_to_id("x")
    forced = client.completions.create(
        model="tiny", prompt="Once upon a", max_tokens=5, temperature=0, logit_bias={str(x): 100}
    )
    assert forced.choices[0].text == "xxxxx"
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0)
    banned = {str(tokenizer.token_to_id(ch)): -100 for ch in set(plain.choices[0].message.content)}
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=5, temperature=0, logit_bias=banned
    )
    assert not set(reply.choices[0].message.content) & set(plain.choices[0].message.content)
    with pytest.raises(openai.BadRequestError, match="token id 5000, outside the vocabulary"):
        client.completions.create(model="tiny", prompt="ab", max_tokens=2, logit_bias={"5000": 1})
    with pytest.raises(openai.BadRequestError, match="from -100 to 100"):
        client.completions.create(model="tiny", prompt="ab", max_tokens=2, logit_bias={"5": 101})
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(model="tiny", prompt="ab", max_tokens=2, logit_bias={"x": 1})


def test_retrieve_a_model_by_id(served, client):
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4o' does not exist; this server serves 'tiny'"):
        client.models.retrieve("gpt-4o")


def test_tokenizer_routes_round_trip_and_need_the_key(served):
    _, _, tokenizer = served
    status, body = post(served, "/tokenize", {"prompt": "hello <|im_end|>", "add_special_tokens": False})
    assert status == 200 and body["tokens"] == tokenizer.encode("hello ") + [tokenizer.token_to_id("<|im_end|>")]
    status, body = post(served, "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and body["prompt"] == "hello <|im_end|>"
    status, info = raw(served[0].port, "GET", "/tokenizer_info")
    assert status == 200 and json.loads(info)["eos_token"] == tokenizer.eos_token
    assert raw(served[0].port, "GET", "/tokenizer_info", key=None)[0] == 401
    assert post(served, "/detokenize", {"tokens": [10**6]})[0] == 400


# Fields clients send that this server does not implement: each is a 400 naming it, never dropped.
UNKNOWN_FIELDS = {
    "/v1/chat/completions": {"messages": MESSAGES, "max_tokens": 2},
    "/v1/completions": {"prompt": "ab", "max_tokens": 2},
    "/v1/embeddings": {"input": "ab"},
}


@pytest.mark.parametrize("path", UNKNOWN_FIELDS)
@pytest.mark.parametrize("field", ["best_of", "modalities", "prediction", "reasoning_effort", "functions", "zzz"])
def test_unknown_fields_are_refused_naming_the_field(served, path, field):
    status, body = post(served, path, {**UNKNOWN_FIELDS[path], field: 1})
    assert status == 400, body
    assert body["error"]["message"] == f"unsupported field {field!r}: this server does not implement it"
    assert body["error"]["param"] == field


def test_the_field_policy_covers_messages_suffix_and_the_documented_no_ops(served, client):
    status, body = post(
        served, "/v1/chat/completions", {"messages": [{**MESSAGES[0], "audio": {"id": "a"}}], "max_tokens": 2}
    )
    assert status == 400 and body["error"]["param"] == "messages.0.audio"
    options = {"messages": MESSAGES, "max_tokens": 2, "stream": True, "stream_options": {"continuous_usage": True}}
    status, body = post(served, "/v1/chat/completions", options)
    assert status == 400 and body["error"]["param"] == "stream_options.continuous_usage"
    with pytest.raises(openai.BadRequestError, match="suffix is not supported"):
        client.completions.create(model="tiny", prompt="ab", suffix="cd", max_tokens=2)
    no_ops = {"user": "someone", "store": False, "metadata": {"k": "v"}, "service_tier": "auto"}
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, **no_ops)
    assert reply.choices[0].finish_reason == "length"
    for request in (ChatCompletionRequest, CompletionRequest, EmbeddingRequest):
        assert request.NO_OP_FIELDS == {"user", "store", "metadata", "service_tier"}


def test_what_the_clients_send_by_default_is_accepted(served):
    """lm-evaluation-harness's local-completions scoring and generation payloads, and LangChain's ChatOpenAI
    defaults (its `_default_params` with streaming usage), all fields implemented."""
    scoring = {"model": "tiny", "prompt": [[5, 6, 7]], "temperature": 0, "max_tokens": 1, "logprobs": 1}
    assert post(served, "/v1/completions", {**scoring, "seed": 1234, "echo": True})[0] == 200
    generation = {"model": "tiny", "prompt": "ab", "max_tokens": 3, "temperature": 0, "stop": ["\n"], "seed": 1}
    assert post(served, "/v1/completions", generation)[0] == 200
    langchain = {"model": "tiny", "stream": False, "n": 1, "temperature": 0.7, "messages": MESSAGES}
    assert post(served, "/v1/chat/completions", {**langchain, "max_completion_tokens": 2})[0] == 200
    streaming = {**langchain, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 2}
    status, data = raw(served[0].port, "POST", "/v1/chat/completions", json.dumps(streaming).encode())
    assert status == 200 and data.decode().rstrip().endswith("data: [DONE]")


def test_langchain_chat_openai_with_its_defaults_and_logprobs(served):
    """What ChatOpenAI sends (invoke, and stream with usage) passes the field policy, and its
    `logprobs=True` comes back in the response metadata."""
    langchain_openai = pytest.importorskip("langchain_openai")
    base_url = f"http://127.0.0.1:{served[0].port}/v1"
    chat = langchain_openai.ChatOpenAI(model="tiny", base_url=base_url, api_key=API_KEY, max_tokens=4, max_retries=0)
    assert chat.invoke("hello").response_metadata["finish_reason"] == "length"
    pieces = list(chat.stream("hello", stream_usage=True))  # sends stream_options.include_usage
    assert sum(piece.usage_metadata["output_tokens"] for piece in pieces if piece.usage_metadata) == 4
    scored = chat.bind(logprobs=True, top_logprobs=2).invoke("hello")
    content = scored.response_metadata["logprobs"]["content"]
    assert len(content) == 4 and all(len(entry["top_logprobs"]) == 2 for entry in content)


@pytest.mark.slow
def test_lm_evaluation_harness_local_completions_scores_like_the_in_process_adapter(tmp_path, monkeypatch):
    """lm_eval's `local-completions` model against a live server (tokenizing through its /tokenize, scoring
    through echo + logprobs) gets the in-process `lmforge` adapter's log-likelihoods and accuracy on a
    multiple-choice task, SmolLM2-135M-Instruct, a local task file."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # a local JSON file; nothing may come from the hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models import openai_completions  # noqa: F401 - registers local-completions
    from lm_eval.tasks import TaskManager

    from lmforge.evaluation.lm_eval_adapter import LmforgeLM

    from ..evaluation.test_lm_eval_adapter import capitals_task_folder

    manager = TaskManager(include_path=str(capitals_task_folder(tmp_path)))
    local = LmforgeLM("smollm2-135m-instruct")
    limit = 12  # questions (x 4 choices)
    ours = lm_eval.simple_evaluate(
        model=local, tasks=["capitals_local"], task_manager=manager, limit=limit, log_samples=True
    )
    server = LiveServer(create_app(ServedModels("smollm2", Scheduler(local.model, local.tokenizer, max_batch=4))))
    try:
        theirs = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"model=smollm2,base_url=http://127.0.0.1:{server.port}/v1/completions",
            tasks=["capitals_local"],
            task_manager=manager,
            limit=limit,
            log_samples=True,
        )
    finally:
        server.stop()
    assert theirs["results"]["capitals_local"]["acc,none"] == ours["results"]["capitals_local"]["acc,none"]
    assert theirs["results"]["capitals_local"]["acc,none"] >= 0.5  # a task the model can do: the scores mean something
    for mine, served_sample in zip(ours["samples"]["capitals_local"], theirs["samples"]["capitals_local"]):
        log_likelihoods = [response[0][0] for response in mine["resps"]]
        assert [response[0][0] for response in served_sample["resps"]] == pytest.approx(log_likelihoods, abs=1e-3)
