"""Images in chat requests: `image_url` parsing and its limits (serve/images.py), the 400s a client gets, and a
tiny random vision-language model served end to end and queried with the official `openai` client."""

import base64
import io
import random
import struct
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lmforge.serve.app import ServedModels, ServeLimits, create_app
from lmforge.serve.images import ImageError, ImageLimits, data_url, decoded_size, request_images
from lmforge.serve.scheduler import Scheduler
from lmforge.serve.schemas import ChatCompletionRequest

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
