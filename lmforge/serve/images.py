"""Images in chat requests: OpenAI's `image_url` content parts, read from base64 `data:` URLs with Pillow.

Each check runs before the work it bounds: the request's image count before any image is decoded, an
image's size from its base64 length before the base64 is decoded, its pixel dimensions from its header
before its pixels are (a small PNG can hold a 50,000 x 50,000 image of one colour). Remote URLs are
refused: fetching them would let a client make this server connect anywhere it can reach.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from lmforge.serve.schemas import ChatMessage, FieldError, ImagePart

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg"}  # what Pillow calls a format -> its media type
MEDIA_TYPES = {"image/png", "image/jpeg", "image/jpg"}  # "image/jpg" is not registered, but clients send it


@dataclass
class ImageLimits:
    """Bounds on a chat request's images (`lmforge serve --max-image-bytes ...`)."""

    max_image_bytes: int = 700_000  # one image's file (PNG/JPEG bytes, after base64 decoding)
    max_images_per_request: int = 4
    max_image_side_pixels: int = 2048  # width and height each; the model resizes to its own input size


class ImageError(FieldError):
    """An image part at fault: a 400 naming the part's field and the limit or rule it breaks."""


def image_parts(messages: list[ChatMessage]) -> list[tuple[str, ImagePart]]:
    """The request's image parts in order, each with its field path (`messages.0.content.1`)."""
    parts = []
    for index, message in enumerate(messages):
        if isinstance(message.content, list):
            for number, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    parts.append((f"messages.{index}.content.{number}", part))
    return parts


def check_image_roles(messages: list[ChatMessage]) -> None:
    """Images go in user messages, as OpenAI takes them."""
    for index, message in enumerate(messages):
        if message.role != "user" and isinstance(message.content, list):
            number = next((n for n, part in enumerate(message.content) if isinstance(part, ImagePart)), None)
            if number is not None:
                field = f"messages.{index}.content.{number}"
                raise ImageError(field, f"{field}: image_url parts go in user messages, not {message.role!r} ones")


def decoded_size(data: str) -> int:
    """Bytes that base64 text `data` (whitespace removed) decodes to, without decoding it."""
    return len(data) * 3 // 4 - data[-2:].count("=")


def read_data_url(url: str, field: str, limits: ImageLimits) -> bytes:
    """The file bytes of a base64 `data:image/png;base64,...` URL, within `limits.max_image_bytes`."""
    scheme = url.split(":", 1)[0].lower() if ":" in url[:16] else ""
    if scheme in ("http", "https"):
        raise ImageError(
            field,
            f"{field}: remote image URLs are not fetched by this server; send the image inline as a "
            "data: URL (data:image/png;base64,... or data:image/jpeg;base64,...)",
        )
    if scheme != "data":
        shown = f"a {scheme}: URL" if scheme else "not a URL"
        raise ImageError(field, f"{field}: {shown}; send the image as a data: URL (data:image/png;base64,...)")
    header, comma, data = url[5:].partition(",")
    parameters = [part.strip().lower() for part in header.split(";")]
    if not comma or "base64" not in parameters[1:]:
        raise ImageError(field, f"{field}: the data: URL must be base64-encoded (data:image/png;base64,...)")
    if parameters[0] not in MEDIA_TYPES:
        raise ImageError(
            field,
            f"{field}: images of type {parameters[0] or '(none)'!r} are not accepted; send PNG or JPEG "
            "(data:image/png;base64,... or data:image/jpeg;base64,...)",
        )
    data = "".join(data.split())  # some clients wrap base64 in lines
    size = decoded_size(data)
    if size > limits.max_image_bytes:
        raise ImageError(
            field,
            f"{field}: the image is {size:,} bytes; the limit is {limits.max_image_bytes:,} bytes per image "
            "(--max-image-bytes)",
        )
    try:
        content = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(field, f"{field}: the data: URL's base64 is not valid") from None
    if not content:
        raise ImageError(field, f"{field}: the image is empty")
    return content


def open_image(content: bytes, field: str, limits: ImageLimits):
    """`content` as a loaded RGB Pillow image: PNG or JPEG, within `limits.max_image_side_pixels` a side."""
    from PIL import Image, UnidentifiedImageError

    allowed = " or ".join(FORMATS)
    side = limits.max_image_side_pixels
    try:
        # only the header is read here; the pixels are read by `load` once the dimensions are known to be fine
        image = Image.open(io.BytesIO(content), formats=list(FORMATS))
    except Image.DecompressionBombError:  # over Pillow's own bound (~179 million pixels), far over ours
        raise ImageError(
            field,
            f"{field}: the image has over {Image.MAX_IMAGE_PIXELS:,} pixels; the limit is {side} pixels per side "
            "(--max-image-side-pixels)",
        ) from None
    except UnidentifiedImageError:
        found = _format_of(content)
        what = f"a {found} image" if found else "not an image Pillow can read"
        raise ImageError(field, f"{field}: the data is {what}; send {allowed}") from None
    width, height = image.size
    if width > side or height > side:
        raise ImageError(
            field,
            f"{field}: the image is {width}x{height} pixels; the limit is {side} pixels per side "
            "(--max-image-side-pixels)",
        )
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as error:  # Pillow's ways of saying a file is cut short or corrupt
        raise ImageError(field, f"{field}: the {image.format} image cannot be decoded ({error})") from None
    return image.convert("RGB")


def _format_of(content: bytes) -> str | None:
    """The format Pillow would see in `content` among all it knows (for the error message only)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(content)) as image:
            return image.format
    except Exception:  # noqa: BLE001 - any failure means "not a known format"
        return None


def request_images(messages: list[ChatMessage], limits: ImageLimits) -> list:
    """Every image of a chat request as a loaded RGB Pillow image, checked, in the order they appear."""
    check_image_roles(messages)
    parts = image_parts(messages)
    if len(parts) > limits.max_images_per_request:
        raise ImageError(
            "messages",
            f"the request has {len(parts)} images; the limit is {limits.max_images_per_request} per request "
            "(--max-images-per-request)",
        )
    images = []
    for field, part in parts:
        field = f"{field}.image_url.url"
        content = read_data_url(part.image_url.url, field, limits)
        images.append(open_image(content, field, limits))
    return images


def data_url(content: bytes, media_type: str = "image/png") -> str:
    """`content` (a file's bytes) as a base64 data: URL, as clients send images."""
    return f"data:{media_type};base64,{base64.b64encode(content).decode('ascii')}"
