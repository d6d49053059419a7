"""Images in chat requests: `image_url` parsing and its limits (serve/images.py), the 400s a client gets, and a
tiny random vision-language model served end to end and queried with the official `openai` client."""

import base64
import io
import random
import struct
import threading
import time
import zlib
from dataclasses import replace

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from lmforge.apps import vlm
from lmforge.finetune.lora import remove_lora
from lmforge.model import ModelConfig, Transformer
from lmforge.serve.app import ServedModels, ServeLimits, create_app
from lmforge.serve.images import ImageError, ImageLimits, data_url, decoded_size, request_images
from lmforge.serve.scheduler import GenerationRequest, Scheduler
from lmforge.serve.schemas import ChatCompletionRequest
from lmforge.settings import LLAMA_SWITCHES, SamplingConfig
from lmforge.tokenizer import DEFAULT_SPECIAL_TOKENS, CharTokenizer

from .test_serve import tiny_chat_model


def png_bytes(width=8, height=8, colour=(255, 0, 0), mode="RGB", format="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buffer, format=format)
    return buffer.getvalue()


def chat_body(*parts, role="user", **fields) -> dict:
    content = [{"type": "text", "text": "What is this?"}, *parts]
    return {"messages": [{"role": role, "content": content}], **fields}


def image_part(url: str, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def images_of(body: dict, limits: ImageLimits | None = None) -> list:
    return request_images(ChatCompletionRequest(**body).messages, limits or ImageLimits())


def refusal(body: dict, limits: ImageLimits | None = None) -> ImageError:
    with pytest.raises(ImageError) as caught:
        images_of(body, limits)
    return caught.value


def test_png_and_jpeg_data_urls_decode_to_their_pixels():
    png = images_of(chat_body(image_part(data_url(png_bytes(5, 3, (10, 200, 30))), detail="low")))
    assert len(png) == 1 and png[0].size == (5, 3) and png[0].mode == "RGB"
    assert png[0].getpixel((4, 2)) == (10, 200, 30)
    jpeg = images_of(chat_body(image_part(data_url(png_bytes(16, 16, (0, 0, 255), format="JPEG"), "image/jpeg"))))
    red, green, blue = jpeg[0].getpixel((8, 8))
    assert blue > 240 and red < 15 and green < 15  # JPEG is lossy; the colour survives
    # grey and transparent PNGs come out RGB, and base64 wrapped in lines (as some clients send it) reads too
    grey = data_url(png_bytes(4, 4, 128, mode="L"))
    wrapped = grey[:40] + "\n" + grey[40:]
    assert [image.mode for image in images_of(chat_body(image_part(wrapped)))] == ["RGB"]


def test_images_keep_their_order_across_messages():
    first, second = data_url(png_bytes(colour=(255, 0, 0))), data_url(png_bytes(colour=(0, 255, 0)))
    body = {
        "messages": [
            {"role": "user", "content": [image_part(first)]},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": [{"type": "text", "text": "and this?"}, image_part(second)]},
        ]
    }
    assert [image.getpixel((0, 0)) for image in images_of(body)] == [(255, 0, 0), (0, 255, 0)]


def test_remote_and_other_urls_are_refused_with_the_reason():
    for url in ("https://example.com/cat.png", "http://169.254.169.254/latest/meta-data"):
        error = refusal(chat_body(image_part(url)))
        assert error.field == "messages.0.content.1.image_url.url"
        assert "remote image URLs are not fetched" in str(error) and "data:image/png;base64" in str(error)
    assert "a file: URL" in str(refusal(chat_body(image_part("file:///etc/passwd"))))
    assert "not a URL" in str(refusal(chat_body(image_part("iVBORw0KGgo="))))
    raw = "data:image/png," + png_bytes().decode("latin-1")
    assert "must be base64-encoded" in str(refusal(chat_body(image_part(raw))))
    assert "base64 is not valid" in str(refusal(chat_body(image_part("data:image/png;base64,@@@@"))))


def test_each_limit_is_a_refusal_naming_it():
    limits = ImageLimits(max_image_bytes=2_000, max_images_per_request=2, max_image_side_pixels=64)
    noisy = Image.frombytes("RGB", (60, 60), random.Random(0).randbytes(60 * 60 * 3))  # noise: PNG cannot shrink it
    buffer = io.BytesIO()
    noisy.save(buffer, format="PNG")
    assert len(buffer.getvalue()) > 2_000
    error = refusal(chat_body(image_part(data_url(buffer.getvalue()))), limits)
    assert f"{len(buffer.getvalue()):,} bytes" in str(error) and "limit is 2,000 bytes per image" in str(error)
    assert "--max-image-bytes" in str(error)

    three = [image_part(data_url(png_bytes())) for _ in range(3)]
    error = refusal(chat_body(*three), limits)
    assert error.field == "messages" and "3 images; the limit is 2 per request" in str(error)

    error = refusal(chat_body(image_part(data_url(png_bytes(65, 10)))), limits)
    assert "65x10 pixels; the limit is 64 pixels per side" in str(error)
    assert images_of(chat_body(image_part(data_url(png_bytes(64, 64)))), limits)[0].size == (64, 64)


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims `width` x `height` pixels (as a decompression bomb's does)."""
    png = png_bytes(8, 8)
    header = png[12:16] + struct.pack(">II", width, height) + png[24:29]  # the IHDR chunk's type and data
    return png[:12] + header + struct.pack(">I", zlib.crc32(header)) + png[33:]


def test_a_decompression_bomb_is_refused_before_its_pixels_are_read():
    assert Image.open(io.BytesIO(png_claiming(5000, 3000))).size == (5000, 3000)
    error = refusal(chat_body(image_part(data_url(png_claiming(5000, 3000)))))
    assert "5000x3000 pixels; the limit is 2048 pixels per side" in str(error)
    error = refusal(chat_body(image_part(data_url(png_claiming(20_000, 20_000)))))  # over Pillow's own bound
    assert "over 89,478,485 pixels; the limit is 2048 pixels per side" in str(error)


def test_formats_other_than_png_and_jpeg_are_refused():
    gif = png_bytes(format="GIF")
    error = refusal(chat_body(image_part(data_url(gif, "image/png"))))  # mislabelled: the bytes decide
    assert "the data is a GIF image; send PNG or JPEG" in str(error)
    assert "'image/gif' are not accepted" in str(refusal(chat_body(image_part(data_url(gif, "image/gif")))))
    assert "not an image Pillow can read" in str(refusal(chat_body(image_part(data_url(b"hello world!")))))
    truncated = png_bytes(32, 32)[:-30]
    assert "cannot be decoded" in str(refusal(chat_body(image_part(data_url(truncated)))))


def test_images_belong_in_user_messages():
    body = chat_body(image_part(data_url(png_bytes())), role="system")
    error = refusal(body)
    assert error.field == "messages.0.content.1" and "go in user messages, not 'system'" in str(error)


def test_decoded_size_is_exact_without_decoding():
    for length in range(10):
        text = base64.b64encode(bytes(length)).decode()
        assert decoded_size(text) == length


@pytest.fixture(scope="module")
def text_only_server():
    model, tokenizer = tiny_chat_model()
    app = create_app(ServedModels("tiny", Scheduler(model, tokenizer, max_batch=2)), ServeLimits(max_tokens=16))
    with TestClient(app) as client:
        yield client


def post(client, body):
    response = client.post("/v1/chat/completions", json=body)
    return response.status_code, response.json()


def test_a_text_only_model_refuses_images_with_the_reason(text_only_server):
    status, body = post(text_only_server, chat_body(image_part(data_url(png_bytes())), max_tokens=2))
    assert status == 400 and body["error"]["param"] == "messages"
    assert "'tiny' is a text-only language model and cannot read images" in body["error"]["message"]
    # the same request without the image is answered, text parts joined
    status, body = post(text_only_server, chat_body(max_tokens=2))
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_malformed_image_parts_are_400s_naming_the_field(text_only_server):
    status, body = post(text_only_server, chat_body({"type": "image_url", "image_url": {"url": "x", "size": 3}}))
    assert status == 400 and body["error"]["param"] == "messages.0.content.1.image_url.size"
    assert body["error"]["message"].startswith("unsupported field 'messages.0.content.1.image_url.size'")
    # the part the client sent is what the error is about, not the content-as-a-string branch
    status, body = post(text_only_server, chat_body({"type": "input_audio", "input_audio": {}}))
    assert status == 400 and body["error"]["param"] == "messages.0.content.1"
    assert "messages.0.content.1: Input tag 'input_audio'" in body["error"]["message"]
    assert "expected tags: 'text', 'image_url'" in body["error"]["message"]
    status, body = post(text_only_server, chat_body(image_part("data:,", detail="ultra")))
    assert status == 400 and body["error"]["param"] == "messages.0.content.1.image_url.detail"


# --- a tiny random vision-language model, served ----------------------------------------------------------------

CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?':\n"
VLM_TOKENIZER = CharTokenizer(CHARS, special_tokens=(*DEFAULT_SPECIAL_TOKENS, "<image>"))


def tiny_vlm(seed=0, count_tokens=False):
    """3x3 patches of 8 pixels and a class token: 10 image tokens (22 with a count token per kind of object);
    random weights with adapters that matter, merged as `load_vlm` merges them (so the language model is
    plain, and the native kernels run it)."""
    torch.manual_seed(seed)
    language_model = Transformer(
        ModelConfig(
            vocab_size=VLM_TOKENIZER.vocab_size, block_size=256, n_layers=2, n_heads=4, n_kv_heads=2, d_model=48,
            **LLAMA_SWITCHES,
        )
    ).eval()  # fmt: skip
    config = vlm.VLMConfig(
        base_model=None, image_size=24, patch_size=8, vision_layers=1, vision_d_model=32, projector_hidden=32,
        lora_rank=4, count_tokens=count_tokens,
    )  # fmt: skip
    model = vlm.build_vision_language_model(language_model, VLM_TOKENIZER, config, seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_b" in name or name.startswith("projector"):
                parameter.normal_(0, 0.2)
    remove_lora(model.language_model)
    return model.eval().requires_grad_(False)


def picture(seed: int) -> Image.Image:
    """A 24x24 picture of random coloured blocks: different seeds, different images."""
    rng = random.Random(seed)
    image = Image.new("RGB", (24, 24))
    for cell in range(9):
        colour = tuple(rng.randrange(256) for _ in range(3))
        image.paste(colour, (8 * (cell % 3), 8 * (cell // 3), 8 * (cell % 3) + 8, 8 * (cell // 3) + 8))
    return image


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def reference_reply(model, messages: list[dict], images: list, max_tokens: int) -> str:
    """The reply `generate_with_images` gives (greedy): what the server must answer."""
    sampling = SamplingConfig(temperature=0, max_new_tokens=max_tokens)
    return "".join(vlm.generate_with_images(model, VLM_TOKENIZER, messages, images, sampling))


def question(text: str, image: Image.Image | None) -> list[dict]:
    """A user's question about `image`, the image first as the model's training chats have it."""
    parts = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def run_request(scheduler: Scheduler, model, text: str, image, max_tokens: int = 12) -> tuple[str, list]:
    """The reply of `scheduler` to one question about `image` (None: no image), and its tokens' scores."""
    ids, _ = vlm.vision_prompt_ids(model, VLM_TOKENIZER, question(text, image))
    pixels = None if image is None else model.preprocess_image(image)[None]
    done, pieces, scores = threading.Event(), [], []

    def emit(event):
        if event[0] == "text":
            pieces.append(event[1])
            scores.extend(event[2])
        if event[0] in ("done", "error"):
            assert event[0] == "done", event
            done.set()

    request = GenerationRequest(ids, max_tokens, emit, images=pixels, stop_ids=frozenset(), logprobs=3)
    scheduler.submit(request)
    assert done.wait(60)
    return "".join(pieces), scores


def first_token_logprobs(model, text: str, image) -> torch.Tensor:
    """log-softmax of the model's logits after the prompt, from one plain forward over the whole prompt."""
    ids, _ = vlm.vision_prompt_ids(model, VLM_TOKENIZER, question(text, image))
    with torch.no_grad():
        logits = model(torch.tensor([ids]), model.preprocess_image(image)[None])
    return logits[0, -1].float().log_softmax(-1)


@pytest.fixture(scope="module")
def vision_scheduler():
    model = tiny_vlm()
    scheduler = Scheduler(model.language_model, VLM_TOKENIZER, max_batch=2, vision=model)
    scheduler.start()
    yield scheduler, model
    scheduler.shutdown(0)


def test_the_scheduler_answers_as_generate_with_images(vision_scheduler):
    scheduler, model = vision_scheduler
    for seed in (1, 2):
        image = picture(seed)
        text, scores = run_request(scheduler, model, "what is this?", image)
        assert text == reference_reply(model, question("what is this?", image), [image], 12)
        expected = first_token_logprobs(model, "what is this?", image)
        assert scores[0].logprob == pytest.approx(float(expected[scores[0].token_id]), abs=1e-4)
    # a text-only chat to the same model: no images, its plain tokens
    text, _ = run_request(scheduler, model, "hello", None)
    assert text == reference_reply(model, question("hello", None), [], 12)


def test_image_and_text_prompts_prefill_together_each_from_its_own_input():
    model = tiny_vlm()
    scheduler = Scheduler(model.language_model, VLM_TOKENIZER, max_batch=4, vision=model, prefix_cache=False)
    asked = [("what is this?", picture(20)), ("hello there", None), ("and this one?", picture(21))]
    events = [[] for _ in asked]
    for (text, image), received in zip(asked, events):
        ids, _ = vlm.vision_prompt_ids(model, VLM_TOKENIZER, question(text, image))
        pixels = None if image is None else model.preprocess_image(image)[None]
        scheduler.submit(GenerationRequest(ids, 1, received.append, images=pixels, logprobs=2))
    batches = []
    prefill = scheduler._prefill
    scheduler._prefill = lambda group: batches.append(len(group)) or prefill(group)
    scheduler.start()  # all three are waiting: admitted together, prefilled in one right-padded batch
    deadline = time.monotonic() + 60
    while not all(received and received[-1][0] == "done" for received in events) and time.monotonic() < deadline:
        time.sleep(0.01)
    scheduler.shutdown(0)
    assert batches == [3]
    for (text, image), received in zip(asked, events):
        ids, _ = vlm.vision_prompt_ids(model, VLM_TOKENIZER, question(text, image))
        pixels = None if image is None else model.preprocess_image(image)[None]
        with torch.no_grad():
            expected = model(torch.tensor([ids]), pixels)[0, -1].float().log_softmax(-1)
        (score,) = [score for kind, _, scores in received if kind == "text" for score in scores]
        assert score.token_id == int(expected.argmax())
        assert score.logprob == pytest.approx(float(expected.max()), abs=1e-4)


def test_a_short_image_prompt_prefills_from_its_embeddings_too():
    """32 prompt tokens (no system prompt, "hi"): short enough for the engine's native prefill from token ids,
    which must not take a prompt whose image tokens need the image's features."""
    model = tiny_vlm()
    model.config = replace(model.config, system_prompt="")
    scheduler = Scheduler(model.language_model, VLM_TOKENIZER, max_batch=1, vision=model)
    scheduler.start()
    try:
        _, scores = run_request(scheduler, model, "hi", picture(7), max_tokens=1)
    finally:
        scheduler.shutdown(0)
    ids, _ = vlm.vision_prompt_ids(model, VLM_TOKENIZER, question("hi", picture(7)))
    assert len(ids) == 32
    expected = first_token_logprobs(model, "hi", picture(7))
    assert scores[0].logprob == pytest.approx(float(expected[scores[0].token_id]), abs=1e-4)


def test_the_prefix_cache_never_reuses_a_prefix_across_different_images():
    model = tiny_vlm()
    scheduler = Scheduler(model.language_model, VLM_TOKENIZER, max_batch=2, vision=model)
    scheduler.start()
    first, second = picture(10), picture(11)
    ids, _ = vlm.vision_prompt_ids(model, VLM_TOKENIZER, question("what is this?", first))
    before_image = ids.index(model.image_token_id)
    replies, reused = [], []
    try:
        for image in (first, first, second):
            count = scheduler.metrics["prefix_cache_reused_tokens_total"]
            replies.append(run_request(scheduler, model, "what is this?", image))
            reused.append(scheduler.metrics["prefix_cache_reused_tokens_total"] - count)
    finally:
        scheduler.shutdown(0)
    # the same image again: all of the prompt but its last token; another image: only the text before it
    assert reused == [0, len(ids) - 1, before_image]
    expected = [first_token_logprobs(model, "what is this?", image) for image in (first, second)]
    assert (expected[0] - expected[1]).abs().max() > 1e-3  # the image matters: a wrong image's prefix would show
    for (_, scores), reference in zip(replies, [expected[0], expected[0], expected[1]]):
        chosen = scores[0].token_id
        assert scores[0].logprob == pytest.approx(float(reference[chosen]), abs=1e-4)
        assert [token for token, _ in scores[0].top] == reference.topk(3).indices.tolist()


def test_prefix_keys_stand_for_the_images_content():
    model = tiny_vlm()
    scheduler = Scheduler(model.language_model, VLM_TOKENIZER, max_batch=1, vision=model)
    ids, _ = vlm.vision_prompt_ids(model, VLM_TOKENIZER, question("what is this?", picture(1)))

    def key(*images):
        pixels = torch.stack([model.preprocess_image(image) for image in images])
        request = GenerationRequest(prompt_ids=ids, max_tokens=1, emit=print, images=pixels)
        return scheduler.prefix_key(request)

    same, other = key(picture(1)), key(picture(2))
    assert key(picture(1)) == same and same != other
    image_positions = [position for position, token in enumerate(ids) if token == model.image_token_id]
    assert len(image_positions) == model.tokens_per_image
    assert [same[position][1] for position in image_positions] == list(range(model.tokens_per_image))
    assert [same[p] for p in range(len(ids)) if p not in image_positions] == [
        token for token in ids if token != model.image_token_id
    ]
    # a request whose image-token count does not fit its images is refused before it queues
    with pytest.raises(ValueError, match="10 image tokens for 2 image"):
        scheduler.submit_all(
            [GenerationRequest(prompt_ids=ids, max_tokens=1, emit=print, images=torch.zeros(2, 3, 24, 24))]
        )


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory):
    """`lmforge serve FOLDER` of a saved tiny VLM, on a real port."""
    from lmforge.serve import ServeConfig, build_app

    from .test_serve import LiveServer

    folder = tmp_path_factory.mktemp("vlm") / "vlm"
    vlm.save_vlm(tiny_vlm(), VLM_TOKENIZER, folder)
    model, _ = vlm.load_vlm(folder)
    config = ServeConfig(model=str(folder), model_name="tiny-vlm", embedding_model="none", max_image_bytes=50_000)
    server = LiveServer(build_app(config))
    yield server, model
    server.stop()


@pytest.fixture(scope="module")
def vision_client(vision_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{vision_server[0].port}/v1", api_key="none", max_retries=0)


def test_the_openai_client_asks_a_served_vlm_about_an_image(vision_server, vision_client):
    _, model = vision_server
    image = picture(3)
    content = [
        {"type": "image_url", "image_url": {"url": data_url(png_of(image)), "detail": "auto"}},
        {"type": "text", "text": "what is this?"},
    ]
    reply = vision_client.chat.completions.create(
        model="tiny-vlm", messages=[{"role": "user", "content": content}], max_tokens=10, temperature=0
    )
    expected = reference_reply(model, question("what is this?", image), [image], 10)
    assert reply.choices[0].message.content == expected
    ids, _ = vlm.vision_prompt_ids(model, VLM_TOKENIZER, question("what is this?", image))
    assert reply.usage.prompt_tokens == len(ids)  # the image's tokens count as prompt tokens
    stream = vision_client.chat.completions.create(
        model="tiny-vlm", messages=[{"role": "user", "content": content}], max_tokens=10, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected
    (card,) = vision_client.models.list().data
    assert card.id == "tiny-vlm" and "vision" in card.capabilities


def test_text_cannot_forge_an_image_token():
    model = tiny_vlm()
    app = create_app(ServedModels("v", Scheduler(model.language_model, VLM_TOKENIZER, max_batch=1, vision=model)))
    forged = {"type": "text", "text": "what\ue002 is this?"}  # the private-use mark of an image's place
    with TestClient(app) as client:
        for content in ([image_part(data_url(png_of(picture(1)))), forged], [forged], forged["text"]):
            status, body = post(client, {"messages": [{"role": "user", "content": content}], "max_tokens": 2})
            assert status == 400 and "contains U+E002, which marks an image" in body["error"]["message"]


def test_a_served_vlm_refuses_what_breaks_the_rules_with_400s(vision_server, vision_client):
    import openai

    def ask(url: str):
        part = {"type": "image_url", "image_url": {"url": url}}
        return vision_client.chat.completions.create(
            model="tiny-vlm", messages=[{"role": "user", "content": [part]}], max_tokens=2
        )

    with pytest.raises(openai.BadRequestError, match="remote image URLs are not fetched") as caught:
        ask("https://example.com/cat.png")
    assert caught.value.body["param"] == "messages.0.content.0.image_url.url"
    noise = Image.frombytes("RGB", (200, 200), random.Random(1).randbytes(200 * 200 * 3))
    with pytest.raises(openai.BadRequestError, match=r"limit is 50,000 bytes per image \(--max-image-bytes\)"):
        ask(data_url(png_of(noise)))
    with pytest.raises(openai.BadRequestError, match="the data is a GIF image; send PNG or JPEG"):
        ask(data_url(png_bytes(format="GIF")))
    with pytest.raises(openai.BadRequestError, match="5 images; the limit is 4 per request"):
        vision_client.chat.completions.create(
            model="tiny-vlm",
            messages=[{"role": "user", "content": [image_part(data_url(png_bytes()))] * 5}],
            max_tokens=2,
        )


@pytest.mark.slow
def test_a_vlm_over_smollm2_served_answers_as_lmforge_chat_does(tmp_path):
    """SmolLM2-135M-Instruct with a (random) image encoder, saved as `finetune --task vision-chat` saves it (an
    adapter over the named base), served, asked with the openai client: its chat template places the image's
    tokens, and the server's default sampling is `lmforge chat --image`'s (greedy)."""
    import openai

    from lmforge.apps import scenes
    from lmforge.formats.loading import load
    from lmforge.serve import ServeConfig, build_app

    from ..conftest import skip_without_smollm2
    from .test_serve import LiveServer

    skip_without_smollm2()
    language_model, tokenizer = load("smollm2-135m-instruct", keep_quantized=False)
    model = vlm.build_vision_language_model(language_model, tokenizer, vlm.VLMConfig(), seed=0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_b" in name:
                parameter.normal_(0, 0.01)
    vlm.save_vlm(model.eval(), tokenizer, tmp_path / "vlm")
    chat = scenes.vision_chats(3, "test", seed=0)[0]
    server = LiveServer(build_app(ServeConfig(model=str(tmp_path / "vlm"), model_name="vlm", embedding_model="none")))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0)
        content = [
            {"type": "image_url", "image_url": {"url": data_url(png_of(chat.image))}},
            {"type": "text", "text": chat.question},
        ]
        reply = client.chat.completions.create(model="vlm", messages=[{"role": "user", "content": content}])
        card = client.models.retrieve("vlm")
    finally:
        server.stop()
    loaded, tokenizer = vlm.load_vlm(tmp_path / "vlm")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": chat.question}]}]
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=128)
    assert reply.choices[0].message.content == "".join(
        vlm.generate_with_images(loaded, tokenizer, messages, [chat.image], sampling)
    )
    assert reply.usage.prompt_tokens == len(vlm.vision_prompt_ids(loaded, tokenizer, messages)[0])
    assert card.model_extra["sampling_defaults"]["temperature"] == 0.0 and "vision" in card.model_extra["capabilities"]
