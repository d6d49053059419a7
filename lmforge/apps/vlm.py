"""A vision-language chat model, LLaVA-style (Liu et al. 2023): image → ViT → MLP projector → image
tokens in the language model's input sequence.

    image (3, 48, 48) → ViT (vision.py's, from the core Block) → class token + one token per 16x16 patch
      → projector (Linear, GELU, Linear; LLaVA-1.5's) → `tokens_per_image` vectors of d_model
      → put where the prompt's image placeholders are, in place of their token embeddings
      → the language model (SmolLM2-135M-Instruct) answers

Training (`train_vision_chat`, `lmforge finetune --task vision-chat`) has two stages, as LLaVA's:
the ViT first learns the generated images' labels (which digit; what is in each scene cell), cheap
and direct; then, with the ViT and the language model frozen, the projector and LoRA adapters on the
language model learn from the chats, the loss on the assistant's tokens only (`finetune/sft.py`'s
masks). Generation prefills from the embeddings and then decodes as any prompt
(`inference/generate.py`). A checkpoint folder holds the ViT and projector, the adapter (or the whole
language model when it has no name to load it by) and `vlm_config.json`.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lmforge.apps.scenes import COLOURS, GRID, MAX_OBJECTS, POSITIONS, SHAPES, VisionChat, vision_chats
from lmforge.apps.vision import VisionTransformer, ViTConfig
from lmforge.atomic import remove, write_folder_atomically
from lmforge.errors import LmforgeError
from lmforge.finetune.lora import LoraConfig, apply_lora, count_trainable, lora_layers, remove_lora
from lmforge.finetune.sft import IGNORE, tokenize_conversation, training_pair
from lmforge.inference.chat import ChatSession, chat_pieces, chat_stop_strings
from lmforge.inference.generate import generate
from lmforge.model import Transformer
from lmforge.settings import SamplingConfig, VisionChatConfig
from lmforge.tokenizer import Tokenizer, stop_token_ids
from lmforge.training import distributed, fit
from lmforge.training.fit import Fittable
from lmforge.training.parallelize import gather_full_weights, weightless_copy, writes_sharded_checkpoints
from lmforge.training.pretrain import resolve_device
from lmforge.training.run_folder import (
    SHARDED_TRAINING_STATE,
    TRAINING_STATE,
    claim_fine_tune_folder,
    fine_tune_checkpointing,
    settings_to_record,
)

CONFIG_FILE = "vlm_config.json"
VISION_WEIGHTS = "vision.safetensors"  # ViT + projector
ADAPTER_FOLDER = "adapter"  # the language model's LoRA adapter, over `base_model`
LANGUAGE_MODEL_FOLDER = "language_model"  # the whole language model, when `base_model` is None
IMAGE_MARK = "\ue002"  # a private-use character: an image's place in a rendered chat, before tokenizing
# Special tokens a chat never uses, to hold image positions; the first the vocabulary has is taken.
# SmolLM2 has no <image>; its <empty_output> (a Jupyter marker from its code data) serves.
IMAGE_TOKEN_CHOICES = ("<image>", "<|image|>", "<empty_output>")
DEFAULT_SYSTEM_PROMPT = "Answer questions about the image."  # 6 tokens, not SmolLM2's default 20
MAX_IMAGE_PIXELS = 4096 * 4096  # a larger image is refused before it is decoded in full


@dataclass
class VLMConfig:
    base_model: str | None = "smollm2-135m-instruct"  # loaded by name; None: saved in the checkpoint
    image_size: int = 48
    patch_size: int = 16  # 3x3 patches: one per scene cell
    vision_layers: int = 4
    vision_heads: int = 4
    vision_d_model: int = 128
    projector_hidden: int = 576
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = field(default=("qkv", "out", "up", "down"))
    system_prompt: str = DEFAULT_SYSTEM_PROMPT  # used when a chat brings none
    image_token: str | None = None  # unset: the first of IMAGE_TOKEN_CHOICES the tokenizer has
    # three more image tokens per colour and shape: its words and how many (read off the class token)
    count_tokens: bool = True

    def __post_init__(self):
        self.lora_targets = tuple(self.lora_targets)

    def vit_config(self) -> ViTConfig:
        return ViTConfig(
            image_size=self.image_size, patch_size=self.patch_size, channels=3, classes=10,
            n_layers=self.vision_layers, n_heads=self.vision_heads, d_model=self.vision_d_model, dropout=0.0,
        )  # fmt: skip


def image_token_for(tokenizer: Tokenizer, name: str | None = None) -> tuple[str, int]:
    """(token, id) that marks image positions: `name`, or the first of IMAGE_TOKEN_CHOICES in the vocabulary."""
    for token in [name] if name else IMAGE_TOKEN_CHOICES:
        if token in tokenizer.special_tokens and tokenizer.token_to_id(token) is not None:
            return token, tokenizer.token_to_id(token)
    wanted = name or " or ".join(IMAGE_TOKEN_CHOICES)
    raise LmforgeError(f"the tokenizer has no special token {wanted} to hold image positions")


def preprocess_image(image: Image.Image, image_size: int = VLMConfig.image_size) -> torch.Tensor:
    """A PIL image as the encoder's input: RGB, resized to image_size square, (3, S, S) in [0, 1]."""
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise LmforgeError(f"image of {image.width}x{image.height} pixels is over the limit of {MAX_IMAGE_PIXELS}")
    image = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.reshape(image_size, image_size, 3).permute(2, 0, 1).float() / 255


def encoder_features(encoder: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Every token's final-norm output of the ViT (B, 1 + patches, d): what its classifier head reads at 0."""
    x = encoder.embed(images)
    for block in encoder.blocks:
        x = block(x, None, None)
    return encoder.final_norm(x)


KINDS = [(colour, shape) for colour in COLOURS for shape in SHAPES]  # what a count question can ask about
COUNTS = MAX_OBJECTS + 1  # 0 .. MAX_OBJECTS of a kind
TOKENS_PER_COUNT = 3  # colour, shape, number


class ObjectCounter(nn.Module):
    """Three image tokens per kind of object, read as text: its colour's word, its shape's (plural) and
    the number word expected under the count head's distribution (the head reads the ViT's class token;
    stage 1 trains it), so the image says "red circles 2 red squares 0 ...". A count question then
    finds its kind's words and copies the number after them, as a language model copies from its
    prompt. Counting the matching cell tokens was not learned in 75 steps (every answer "There are 3."),
    nor was reading one token per kind that summed the kind's and the number's embeddings."""

    def __init__(self, vision_d_model: int, d_model: int):
        super().__init__()
        self.head = nn.Linear(vision_d_model, len(KINDS) * COUNTS)
        self.kind_embeddings = nn.Parameter(torch.zeros(len(KINDS), 2, d_model))  # colour, shape
        self.number_embeddings = nn.Parameter(torch.zeros(COUNTS, d_model))

    def count_logits(self, class_features: torch.Tensor) -> torch.Tensor:
        """(B, vision_d_model) → (B, len(KINDS), COUNTS)."""
        return self.head(class_features).reshape(len(class_features), len(KINDS), COUNTS)

    def forward(self, class_features: torch.Tensor) -> torch.Tensor:
        """(B, vision_d_model) → (B, len(KINDS) * TOKENS_PER_COUNT, d_model)."""
        numbers = self.count_logits(class_features).softmax(-1) @ self.number_embeddings
        kinds = self.kind_embeddings.expand(len(numbers), -1, -1, -1)
        return torch.cat([kinds, numbers[:, :, None]], dim=2).flatten(1, 2)


class VisionLanguageModel(nn.Module):
    """ViT encoder, MLP projector and a decoder-only language model whose input takes image tokens."""

    def __init__(self, config: VLMConfig, language_model: Transformer, image_token_id: int):
        super().__init__()
        self.config = config
        self.encoder = VisionTransformer(config.vit_config())
        d_model = language_model.config.d_model
        self.projector = nn.Sequential(
            nn.Linear(config.vision_d_model, config.projector_hidden),
            nn.GELU(),
            nn.Linear(config.projector_hidden, d_model),
        )
        self.language_model = language_model
        self.image_token_id = image_token_id
        patches = config.vit_config().patches
        # added to the patch tokens: where each cell is, in words ("top left"), once grounded
        self.patch_positions = nn.Parameter(torch.zeros(patches, d_model))
        self.counter = ObjectCounter(config.vision_d_model, d_model) if config.count_tokens else None
        # the class token, each patch's (row by row), then one per kind of object if counted
        self.tokens_per_image = 1 + patches + (len(KINDS) * TOKENS_PER_COUNT if config.count_tokens else 0)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return preprocess_image(image, self.config.image_size)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The ViT's final-norm outputs (B, 1 + patches, vision_d_model): class token first, then patches."""
        return encoder_features(self.encoder, images)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) → their tokens in the language model's space (B, tokens_per_image, d_model)."""
        features = self.image_features(images)
        tokens = self.projector(features)
        tokens = torch.cat([tokens[:, :1], tokens[:, 1:] + self.patch_positions], dim=1)
        if self.counter is None:
            return tokens
        return torch.cat([tokens, self.counter(features[:, 0])], dim=1)

    def input_embeddings(self, tokens: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """The language model's input (B, T, d_model): token embeddings, with each run of image placeholders
        replaced by the next image's tokens (images in order, row by row)."""
        x = self.language_model.embed(tokens)
        slots = tokens == self.image_token_id
        needed = 0 if images is None else len(images) * self.tokens_per_image
        if int(slots.sum()) != needed:
            raise LmforgeError(
                f"{int(slots.sum())} image placeholder tokens for {needed // self.tokens_per_image} images "
                f"of {self.tokens_per_image} tokens each"
            )
        if not needed:
            return x
        image_tokens = self.image_embeddings(images.to(x.device)).to(x.dtype)
        return x.masked_scatter(slots[..., None], image_tokens.reshape(-1, x.shape[-1]))

    def forward(self, tokens: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) of `tokens` with `images` in their placeholders."""
        embeddings = self.input_embeddings(tokens, images)
        return self.language_model(tokens, embeddings=embeddings)[0]

    def expand_image_placeholders(self, token_ids: list[int], n_images: int) -> list[int]:
        """Ids with each single image placeholder repeated `tokens_per_image` times; there must be `n_images`."""
        return expand_placeholders(token_ids, [False] * len(token_ids), self.image_token_id, self.tokens_per_image,
                                   n_images)[0]  # fmt: skip


def expand_placeholders(
    token_ids: list[int], flags: list[bool], image_token_id: int, tokens_per_image: int, n_images: int
) -> tuple[list[int], list[bool]]:
    """`expand_image_placeholders`, carrying a per-token flag (an assistant mask) along."""
    found = sum(token == image_token_id for token in token_ids)
    if found != n_images:
        raise LmforgeError(f"the prompt has {found} image placeholders for {n_images} images")
    ids, expanded_flags = [], []
    for token, flag in zip(token_ids, flags):
        copies = tokens_per_image if token == image_token_id else 1
        ids += [token] * copies
        expanded_flags += [flag] * copies
    return ids, expanded_flags


# --- chats with images -------------------------------------------------------------------


def marked_messages(messages: list[dict], system_prompt: str | None = None) -> tuple[list[dict], int]:
    """Messages whose content may be a list of OpenAI-style parts ({"type": "text", "text": ...},
    {"type": "image"}) as plain-content messages with IMAGE_MARK where each image goes (parts joined by
    newlines), and the number of images. `system_prompt` goes first when the chat brings none."""
    flattened, images = [], 0
    for index, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    parts.append(IMAGE_MARK)
                    images += 1
                elif kind == "text" and isinstance(part.get("text"), str):
                    if IMAGE_MARK in part["text"]:  # it would become an image token with no image
                        raise LmforgeError(f"message {index}: its text contains U+E002, which marks an image")
                    parts.append(part["text"])
                else:
                    raise LmforgeError(f"message {index}: content parts must be {{'type': 'text', 'text': ...}} "
                                       f"or {{'type': 'image'}}, got {part!r}")  # fmt: skip
            content = "\n".join(parts)
        if isinstance(content, str) and IMAGE_MARK in content and not isinstance(message.get("content"), list):
            raise LmforgeError(f"message {index}: its text contains U+E002, which marks an image; remove it")
        flattened.append({**message, "content": content})
    if system_prompt and not (flattened and flattened[0].get("role") == "system"):
        flattened.insert(0, {"role": "system", "content": system_prompt})
    return flattened, images


def piece_encoder(tokenizer: Tokenizer, image_token_id: int):
    """(text, is_markup) pieces → ids as `tokenizer.encode_marked` gives them, each IMAGE_MARK in a
    message's text becoming one `image_token_id`."""

    def encode(pieces: list[tuple[str, bool]]) -> list[int]:
        ids: list[int] = []
        pending: list[tuple[str, bool]] = []
        for text, is_markup in pieces:
            if is_markup or IMAGE_MARK not in text:
                pending.append((text, is_markup))
                continue
            first, *rest = text.split(IMAGE_MARK)
            pending.append((first, False))
            for stretch in rest:
                ids += tokenizer.encode_marked(pending) + [image_token_id]
                pending = [(stretch, False)]
        return ids + tokenizer.encode_marked(pending)

    return encode


def vision_prompt_ids(
    model: VisionLanguageModel,
    tokenizer: Tokenizer,
    messages: list[dict],
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
) -> tuple[list[int], int]:
    """Prompt ids of a chat whose messages may hold images (placeholders expanded), and how many images;
    `tools` as `encode_chat` takes them."""
    flattened, images = marked_messages(messages, model.config.system_prompt)
    pieces = chat_pieces(tokenizer, flattened, add_generation_prompt, tools)
    ids = piece_encoder(tokenizer, model.image_token_id)(pieces)
    return model.expand_image_placeholders(ids, images), images


def as_pixels(model: VisionLanguageModel, images: list) -> torch.Tensor | None:
    """PIL images or (3, S, S) tensors → one (N, 3, S, S) batch; None for no images."""
    if not images:
        return None
    pixels = torch.stack([model.preprocess_image(im) if isinstance(im, Image.Image) else im for im in images])
    return pixels.to(model.patch_positions.device)


def generate_with_images(
    model: VisionLanguageModel,
    tokenizer: Tokenizer,
    messages: list[dict],
    images: list,
    sampling: SamplingConfig | None = None,
) -> Iterator[str]:
    """Stream the assistant's reply to `messages` (content parts {"type": "image"} where the `images`,
    PIL images or (3, S, S) tensors, go, in order): the prompt's embeddings with the image tokens in
    prefill the cache, then `generate` decodes as for any prompt."""
    ids, count = vision_prompt_ids(model, tokenizer, messages)
    if count != len(images):
        raise LmforgeError(f"the messages have {count} image parts but {len(images)} images came with them")
    sampling = sampling or default_sampling()
    if stops := chat_stop_strings(tokenizer):
        sampling = replace(sampling, stop=[*(sampling.stop or []), *stops])
    device = next(model.language_model.parameters()).device
    with torch.inference_mode():
        embeddings = model.input_embeddings(torch.tensor([ids], device=device), as_pixels(model, images))
    yield from generate(
        model.language_model, tokenizer, ids, sampling, stop_token_ids=stop_token_ids(tokenizer),
        prompt_embeddings=embeddings,
    )  # fmt: skip


def default_sampling() -> SamplingConfig:
    """How a vision-language model answers unless told otherwise (`chat --image`, `serve`): greedily, as a small
    model trained on short answers says them best (a chat model's repetition penalty would also count the
    question's and the image's tokens against it)."""
    return SamplingConfig(temperature=0.0, max_new_tokens=128)


def answer(model: VisionLanguageModel, tokenizer: Tokenizer, image, question: str, max_new_tokens: int = 48) -> str:
    """Greedy reply to one question about one image (None: the question alone)."""
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.insert(0, {"type": "image"})
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    images = [] if image is None else [image]
    return "".join(generate_with_images(model, tokenizer, [{"role": "user", "content": content}], images, sampling))


def open_image(path: str | Path) -> Image.Image:
    """An image file, decoded (RGB); a one-line LmforgeError naming the file if it is not a readable image."""
    from PIL import UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise LmforgeError(
                    f"{path}: {image.width}x{image.height} pixels is over the limit of {MAX_IMAGE_PIXELS}"
                )
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise LmforgeError(f"{path}: not a readable image ({error})") from None


@dataclass
class ImageChatSession(ChatSession):
    """`lmforge chat --image`: a ChatSession whose first question carries the image (kept in the history,
    so later turns still see it)."""

    vision_model: VisionLanguageModel | None = None
    image: Image.Image | None = None

    def reply(self, user_text: str):
        content = user_text
        if self.image is not None and not self.history:
            content = [{"type": "image"}, {"type": "text", "text": user_text}]
        question = {"role": "user", "content": content}
        messages = self.messages() + [question]
        images = [self.image] * sum(isinstance(m["content"], list) for m in messages)
        pieces: list[str] = []
        for piece in generate_with_images(self.vision_model, self.tokenizer, messages, images, self.sampling):
            pieces.append(piece)
            yield piece
        self.history += [question, {"role": "assistant", "content": "".join(pieces)}]


# --- stage 1: the image encoder learns the images' labels --------------------------------

CELL_CLASSES = 1 + len(COLOURS) * len(SHAPES)  # empty, or one colour and shape


def cell_labels(chat: VisionChat) -> list[int]:
    """Per scene cell: 0 empty, else 1 + colour * len(SHAPES) + shape; IGNORE for a digit image."""
    if chat.scene is None:
        return [IGNORE] * GRID * GRID
    labels = [0] * GRID * GRID
    for obj in chat.scene.objects:
        labels[obj.cell] = 1 + list(COLOURS).index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)
    return labels


def count_labels(chat: VisionChat) -> list[int]:
    """Per kind of object (KINDS' order): how many the scene has; IGNORE for a digit image."""
    if chat.scene is None:
        return [IGNORE] * len(KINDS)
    return [chat.scene.count(colour, shape) for colour, shape in KINDS]


class EncoderPretraining(Fittable, nn.Module):
    """The ViT with its heads: the digit from the class token (vision.py's own head), each cell's
    contents from its patch token and, with a counter, each kind's count from the class token.
    Outputs (B, 10 + patches * CELL_CLASSES [+ len(KINDS) * COUNTS])."""

    def __init__(self, encoder: VisionTransformer, counter: ObjectCounter | None = None):
        super().__init__()
        self.encoder = encoder
        self.cell_head = nn.Linear(encoder.config.d_model, CELL_CLASSES)
        self.counter = counter

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = encoder_features(self.encoder, images)
        parts = [self.encoder.head(features[:, 0]), self.cell_head(features[:, 1:]).flatten(1)]
        if self.counter is not None:
            parts.append(self.counter.count_logits(features[:, 0]).flatten(1))
        return torch.cat(parts, dim=1)


def encoder_pretraining_loss(outputs: torch.Tensor, targets: torch.Tensor, from_logits: bool = True) -> torch.Tensor:
    """Per image: cross-entropy of the digit (targets[:, 0]) plus the mean over cells (the next
    columns) plus, when the outputs have counts, the mean over kinds (targets' last len(KINDS) columns);
    IGNORE where a part does not apply (no digit in a scene, no cells or counts in a digit)."""
    counted = outputs.shape[1] - 10 != (targets.shape[1] - 1) * CELL_CLASSES
    kinds = len(KINDS) if counted else 0
    digit_loss = F.cross_entropy(outputs[:, :10], targets[:, 0], ignore_index=IGNORE, reduction="none")
    cells = outputs[:, 10 : outputs.shape[1] - kinds * COUNTS].reshape(len(outputs), -1, CELL_CLASSES)
    cell_targets = targets[:, 1 : targets.shape[1] - kinds]
    cell_loss = F.cross_entropy(cells.transpose(1, 2), cell_targets, ignore_index=IGNORE, reduction="none")
    loss = digit_loss + cell_loss.mean(dim=1)
    if counted:
        counts = outputs[:, -kinds * COUNTS :].reshape(len(outputs), kinds, COUNTS)
        count_loss = F.cross_entropy(counts.transpose(1, 2), targets[:, -kinds:], ignore_index=IGNORE, reduction="none")
        loss = loss + count_loss.mean(dim=1)
    return loss


def pretrain_image_encoder(
    model: VisionLanguageModel, chats: list[VisionChat], epochs: int, seed: int = 0, verbose: int = 1
) -> dict:
    """Stage 1: the ViT learns each image's digit or cell contents; returns the held-in accuracy of both."""
    from lmforge.apps.vision import ProgressOverAllSteps

    if model.encoder.config.patches != GRID * GRID:
        raise LmforgeError(f"the encoder learns one scene cell per patch: it needs {GRID}x{GRID} patches, "
                           f"not {model.encoder.config.patches}")  # fmt: skip
    torch.manual_seed(seed)
    pretraining = EncoderPretraining(model.encoder, model.counter)
    pixels = torch.stack([model.preprocess_image(chat.image) for chat in chats])
    digits = [chat.truth if chat.question_type == "digit" else IGNORE for chat in chats]
    counts = [count_labels(chat) if model.counter is not None else [] for chat in chats]
    targets = torch.tensor([[digit, *cell_labels(chat), *n] for digit, chat, n in zip(digits, chats, counts)])
    for parameter in [*model.encoder.parameters(), *encoder_side(model)]:
        parameter.requires_grad = True
    fit.compile(pretraining, "adamw", encoder_pretraining_loss, from_logits=True, learning_rate=3e-3, weight_decay=0.05)
    callbacks = [fit.WarmupCosine(min_ratio=0.0)] + ([ProgressOverAllSteps()] if verbose else [])
    fit.fit(pretraining, pixels, targets, epochs=epochs, batch_size=64, callbacks=callbacks, verbose=0, seed=seed)
    for parameter in [*model.encoder.parameters(), *encoder_side(model)]:
        parameter.requires_grad = False
    with torch.no_grad():
        outputs = pretraining.eval()(pixels.to(model.patch_positions.device)).cpu()
    model.__dict__["label_heads"] = (model.encoder.head, pretraining.cell_head)  # for `ground_projector`
    digit_rows = targets[:, 0] != IGNORE
    patches = model.encoder.config.patches
    cells = outputs[:, 10 : 10 + patches * CELL_CLASSES].reshape(len(outputs), -1, CELL_CLASSES).argmax(-1)
    scene_rows = ~digit_rows
    result = {
        "digit_accuracy": float((outputs[digit_rows, :10].argmax(-1) == targets[digit_rows, 0]).float().mean()),
        "cell_accuracy": float((cells[scene_rows] == targets[scene_rows, 1 : 1 + patches]).float().mean()),
    }
    if model.counter is not None:
        counted = outputs[:, -len(KINDS) * COUNTS :].reshape(len(outputs), len(KINDS), COUNTS).argmax(-1)
        result["count_accuracy"] = float((counted[scene_rows] == targets[scene_rows, -len(KINDS) :]).float().mean())
    return result


def encoder_side(model: VisionLanguageModel) -> list[nn.Parameter]:
    """What stage 1 trains beside the ViT and stage 2 keeps frozen: the count head."""
    return [] if model.counter is None else list(model.counter.head.parameters())


# --- stage 2: projector and LoRA on the chats --------------------------------------------


def word_embedding(model: VisionLanguageModel, tokenizer: Tokenizer, word: str) -> torch.Tensor:
    """The mean input embedding of `word`'s tokens as it appears mid-sentence (after a space)."""
    ids = tokenizer.encode(" " + word)
    return model.language_model.embed(torch.tensor(ids)).mean(0).detach()


@torch.no_grad()
def ground_projector(model: VisionLanguageModel, tokenizer: Tokenizer) -> None:
    """Start the projector where the language model already reads the images' contents: its first layer's
    first units are stage 1's label heads (digit logits at the class token, cell logits at each patch),
    its second layer maps each label's unit to the embeddings of the label's words ("7"; "red" +
    "circle"). A class token then enters SmolLM2 close to the word for its digit, a red-circle patch
    close to "red circle", so the adapters learn where things are and how many there are, instead of
    first a code for what they are (75 steps learned digits from a random projector, not colours)."""
    digit_head, cell_head = model.__dict__["label_heads"]
    first, second = model.projector[0], model.projector[2]
    labels = digit_head.out_features + cell_head.out_features
    if first.out_features < labels:
        raise LmforgeError(f"projector_hidden must be at least {labels} to start from the label heads")
    # the winning logit is ~10-20 after stage 1; scaled so it reaches GELU's linear part near 1-2
    scale = 0.1
    first.weight[: digit_head.out_features] = digit_head.weight * scale
    first.bias[: digit_head.out_features] = digit_head.bias * scale
    first.weight[digit_head.out_features : labels] = cell_head.weight * scale
    first.bias[digit_head.out_features : labels] = cell_head.bias * scale
    words = [str(digit) for digit in range(digit_head.out_features)]
    words += ["empty"] + [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
    targets = torch.stack([phrase_embedding(model, tokenizer, w) for w in words])
    # the other units start silent (as LoRA's B): the image tokens are the label words and nothing else yet
    second.weight.zero_()
    second.weight[:, :labels] = targets.T.to(second.weight.dtype)
    second.bias.zero_()
    # each patch token also carries its cell's place ("top" + "left"), each count token its kind and number
    model.patch_positions.copy_(torch.stack([phrase_embedding(model, tokenizer, p) for p in POSITIONS]))
    if model.counter is not None:
        kinds = [[word_embedding(model, tokenizer, w) for w in (colour, f"{shape}s")] for colour, shape in KINDS]
        model.counter.kind_embeddings.copy_(torch.stack([torch.stack(pair) for pair in kinds]))
        model.counter.number_embeddings.copy_(
            torch.stack([word_embedding(model, tokenizer, str(n)) for n in range(COUNTS)])
        )


def phrase_embedding(model: VisionLanguageModel, tokenizer: Tokenizer, phrase: str) -> torch.Tensor:
    """The sum of the words' embeddings (`word_embedding` of each)."""
    return sum(word_embedding(model, tokenizer, word) for word in phrase.split())


def without_image(chat_messages: list[dict]) -> list[dict]:
    """The chat with its image parts left out: what the text-only baseline sees."""
    return [
        {**m, "content": [p for p in m["content"] if p.get("type") != "image"]} if isinstance(m["content"], list) else m
        for m in chat_messages
    ]


def chat_rows(
    model: VisionLanguageModel, tokenizer: Tokenizer, chats: list[VisionChat], text_only: bool = False
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """((tokens, images, scored), targets) for `fit`: one chat a row, right-padded, targets IGNORE but on
    the assistant's tokens (`scored` marks those rows' positions whose logits the loss reads)."""
    encode = piece_encoder(tokenizer, model.image_token_id)
    pairs = []
    for chat in chats:
        messages = without_image(chat.messages()) if text_only else chat.messages()
        flattened, images = marked_messages(messages, model.config.system_prompt)
        ids, assistant = tokenize_conversation(tokenizer, flattened, encode)
        ids, assistant = expand_placeholders(ids, assistant, model.image_token_id, model.tokens_per_image, images)
        pairs.append(training_pair(ids, assistant))
    width = max(len(inputs) for inputs, _ in pairs)
    fill = tokenizer.padding_id if tokenizer.padding_id != model.image_token_id else (tokenizer.eos_id or 0)
    tokens = torch.full((len(pairs), width), fill, dtype=torch.long)
    targets = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
    for row, (inputs, scored_targets) in enumerate(pairs):
        tokens[row, : len(inputs)] = torch.tensor(inputs)
        targets[row, : len(scored_targets)] = torch.tensor(scored_targets)
    if text_only:
        images = torch.zeros(len(chats), 0)  # one (empty) entry per row, so `fit` can batch it
    else:
        images = torch.stack([model.preprocess_image(chat.image) for chat in chats])
    return (tokens, images, targets != IGNORE), targets


class VisionChatTrainer(Fittable, nn.Module):
    """The model seen by `fit`: (tokens, images, scored) in, logits out, the LM head run only where the
    loss reads it (a handful of answer tokens a row; over every position it was a fifth of a step)."""

    def __init__(self, model: VisionLanguageModel):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, images: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        language_model = self.model.language_model
        # positions after the batch's last scored token change no loss (attention is causal): not run
        length = int(scored.any(0).nonzero().max()) + 1 if scored.any() else 1
        cut = tokens[:, :length]
        embeddings = self.model.input_embeddings(cut, images if images.numel() else None)
        hidden = language_model.hidden_states(cut, embeddings=embeddings)
        logits = hidden.new_zeros(*tokens.shape, language_model.config.vocab_size)
        logits[:, :length][scored[:, :length]] = language_model.logits(hidden[scored[:, :length]])
        return logits


def build_vision_language_model(
    language_model: Transformer, tokenizer: Tokenizer, config: VLMConfig, seed: int = 0
) -> VisionLanguageModel:
    """A new model around `language_model`: random ViT and projector, LoRA adapters on the language model
    (all of it frozen but the adapters)."""
    torch.manual_seed(seed)
    _, image_token_id = image_token_for(tokenizer, config.image_token)
    model = VisionLanguageModel(config, language_model, image_token_id)
    apply_lora(language_model, LoraConfig(config.lora_rank, config.lora_alpha, 0.0, config.lora_targets))
    return model


def train_vision_chat(
    config: VisionChatConfig, verbose: int = 1, language_model=None, vlm_config: VLMConfig | None = None
) -> dict:
    """`lmforge finetune --task vision-chat`: stage 1 (the encoder) then stage 2 (projector + LoRA) on
    generated chats; writes out/vlm (a checkpoint folder for `load_vlm`) and out/metrics.json.
    `language_model`: a (Transformer, Tokenizer) to use instead of loading `config.model` (then saved
    whole in the checkpoint); `vlm_config`: the encoder's and projector's shape (LoRA's is `config`'s).
    Under torchrun both stages share each batch among the processes, and `config.parallel` fsdp/hsdp
    shards stage 2's model; the main process writes, and alone returns the trained model."""
    out = Path(config.out)
    device = resolve_device(config.device)
    processes = distributed.init_process_group(device.type)
    if processes.is_main:
        run_files = ("vlm", "metrics.json", TRAINING_STATE, SHARDED_TRAINING_STATE)
        claim_fine_tune_folder(out, run_files, config, "run", verbose)
    else:
        verbose = 0
    if language_model is None:
        from lmforge.formats.loading import load

        lm, tokenizer = load(config.model, device=str(device), keep_quantized=False)
        base_model = config.model
    else:
        (lm, tokenizer), base_model = language_model, None
    vlm_config = replace(
        vlm_config or VLMConfig(projector_hidden=lm.config.d_model), base_model=base_model,
        lora_rank=config.lora_rank, lora_alpha=config.lora_alpha, lora_targets=config.lora_targets,
    )  # fmt: skip
    model = build_vision_language_model(lm, tokenizer, vlm_config, config.seed).to(device)
    result: dict = {}
    encoder_file = out / "encoder.safetensors"  # stage 1's result, for --resume (fit saves what trains only)
    started = time.perf_counter()
    if config.text_only:
        result["encoder"] = None
    elif config.resume and encoder_file.exists():
        from safetensors.torch import load_file

        weights = load_file(str(encoder_file), device=str(device))
        model.encoder.load_state_dict({k: v for k, v in weights.items() if not k.startswith("counter.")})
        if model.counter is not None:
            model.counter.head.load_state_dict({k[8:]: v for k, v in weights.items() if k.startswith("counter.")})
    else:
        if verbose:
            print(f"stage 1: the image encoder on {config.encoder_images} scenes and the digits' training split")
        encoder_chats = vision_chats(config.encoder_images, "train", seed=config.seed + 1)
        from lmforge.apps.scenes import digit_chat
        from lmforge.apps.vision import load_digits_split

        train_x, train_y, _, _ = load_digits_split()
        digits = min(config.encoder_images, len(train_y))  # as many digits as scenes, at most all of them
        encoder_chats += [digit_chat(x[0], int(y), "") for x, y in zip(train_x[:digits], train_y[:digits])]
        result["encoder"] = pretrain_image_encoder(model, encoder_chats, config.encoder_epochs, config.seed, verbose)
        ground_projector(model, tokenizer)
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        from lmforge.atomic import write_atomically

        weights = {k: v.contiguous() for k, v in model.encoder.state_dict().items()}
        if model.counter is not None:
            weights |= {f"counter.{k}": v.contiguous() for k, v in model.counter.head.state_dict().items()}
        if processes.is_main:
            write_atomically(encoder_file, lambda path: save_file(weights, str(path)))
    result["encoder_seconds"] = time.perf_counter() - started
    for parameter in [*model.encoder.parameters(), *encoder_side(model)]:
        parameter.requires_grad = False
    chats = vision_chats(config.train_chats, "train", seed=config.seed)
    validation = vision_chats(config.validation_chats, "test", seed=config.seed) if config.validation_chats else []
    x, y = chat_rows(model, tokenizer, chats, config.text_only)
    order = batches_of_similar_length(y, config.batch_size, config.seed)
    x, y = tuple(part[order] for part in x), y[order]
    trainer = VisionChatTrainer(model)
    # Sharded, the trained weights are gathered into this weightless copy to be written (as finetune_chat).
    sharded = processes.is_distributed and writes_sharded_checkpoints(config)
    whole = weightless_copy(trainer) if sharded else trainer
    if verbose:
        print(
            f"stage 2: {len(chats)} chats, rows of {x[0].shape[1]} tokens ({model.tokens_per_image} per image), "
            f"{int(x[2].sum()):,} assistant tokens scored; {count_trainable(model):,} of "
            f"{sum(p.numel() for p in model.parameters()):,} parameters train"
            + (f"; {config.parallel} over {processes.world_size} processes" if sharded else "")
        )
    trainer.compile(
        "adamw", "token_crossentropy", from_logits=True, learning_rate=config.learning_rate, weight_decay=0.0,
        clip_grad_norm=config.clip_grad_norm, parallelism=config.parallelism(),
    )  # fmt: skip
    schedule = fit.WarmupCosine(config.warmup_steps)
    validation_data = chat_rows(model, tokenizer, validation, config.text_only) if validation else None
    started = time.perf_counter()
    history = trainer.fit(
        x, y, epochs=config.epochs, batch_size=config.batch_size, validation_data=validation_data,
        callbacks=[schedule], verbose=verbose, seed=config.seed, shuffle=False,
        **fine_tune_checkpointing(out, config, writes_sharded_checkpoints(config)),
    )  # fmt: skip
    result["chat_seconds"] = time.perf_counter() - started
    result["steps_per_second"] = history_steps(len(chats), config) / result["chat_seconds"]
    result["history"] = history.history
    result["written"] = str(out / "vlm")
    if sharded:
        gather_full_weights(trainer, whole, processes.is_main)
    if processes.is_main:
        save_vlm(whole.model.eval(), tokenizer, out / "vlm")
        metrics = {**result, "config": settings_to_record(config)}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        for state in (TRAINING_STATE, SHARDED_TRAINING_STATE):  # the run is complete: nothing left to resume
            remove(out / state)
        # Sharded, `whole` holds the weights for writing only (no RoPE tables): the model as written.
        result["model"], result["tokenizer"] = load_vlm(out / "vlm", str(device)) if sharded else (model, tokenizer)
    distributed.shutdown(processes)
    return result


def batches_of_similar_length(targets: torch.Tensor, batch_size: int, seed: int) -> torch.Tensor:
    """An order of the rows in which each batch holds rows of similar length (the trainer cuts a batch
    at its last scored token, so a batch of short digit chats does not pay for long descriptions),
    the batches themselves in a seeded random order."""
    scored = targets != IGNORE
    lengths = torch.where(scored.any(1), scored.shape[1] - scored.flip(1).int().argmax(1), 0)
    generator = torch.Generator().manual_seed(seed)
    by_length = torch.randperm(len(targets), generator=generator)
    by_length = by_length[lengths[by_length].argsort(stable=True)]
    batches = list(by_length.split(batch_size))
    return torch.cat([batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()])


def history_steps(examples: int, config: VisionChatConfig) -> int:
    return config.epochs * -(-examples // config.batch_size)


def evaluate_vision_chat(
    model: VisionLanguageModel, tokenizer: Tokenizer, chats: list[VisionChat], text_only: bool = False, progress=None
) -> dict:
    """Greedy replies to each chat's question (without its image if `text_only`), scored by
    `scenes.score_answer`: accuracy and count per question type; for descriptions, object-level
    precision and recall (`scenes.description_matches`: right colour, shape and cell; right colour and
    shape anywhere); and every reply."""
    from lmforge.apps.scenes import description_matches, score_answer

    right: dict[str, list[bool]] = {}
    matches = {"named": 0, "truth": 0, "placed": 0, "kinds": 0}
    replies = []
    for index, chat in enumerate(chats):
        reply = answer(model, tokenizer, None if text_only else chat.image, chat.question)
        correct = score_answer(chat, reply)
        right.setdefault(chat.question_type, []).append(correct)
        if chat.question_type == "describe":
            for key, value in description_matches(chat, reply).items():
                matches[key] += value
        replies.append({"type": chat.question_type, "question": chat.question, "answer": chat.answer,
                        "reply": reply, "right": correct})  # fmt: skip
        if progress is not None:
            progress(index + 1, len(chats))
    accuracy = {kind: sum(marks) / len(marks) for kind, marks in right.items()}
    described = {}
    if matches["truth"]:
        described = {
            "object_precision": matches["placed"] / max(matches["named"], 1),
            "object_recall": matches["placed"] / matches["truth"],
            "kind_precision": matches["kinds"] / max(matches["named"], 1),
            "kind_recall": matches["kinds"] / matches["truth"],
        }
    return {
        "accuracy": accuracy,
        "questions": {kind: len(marks) for kind, marks in right.items()},
        "describe_objects": described,
        "replies": replies,
    }


# --- checkpoints -------------------------------------------------------------------------


def save_vlm(model: VisionLanguageModel, tokenizer: Tokenizer, path: str | Path) -> Path:
    """A checkpoint folder, written atomically: vlm_config.json, vision.safetensors (ViT + projector), and
    the language model's LoRA adapter (over `config.base_model`) or, with no base to load, the language
    model itself (adapters merged into a copy)."""
    from safetensors.torch import save_file

    from lmforge.finetune.lora import save_adapter
    from lmforge.formats.checkpoint import save_model

    config = model.config
    vision = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
    vision |= {f"projector.{k}": v for k, v in model.projector.state_dict().items()}
    vision["patch_positions"] = model.patch_positions
    if model.counter is not None:
        vision |= {f"counter.{k}": v for k, v in model.counter.state_dict().items()}
    vision = {k: v.detach().contiguous().cpu() for k, v in vision.items()}
    token, _ = image_token_for(tokenizer, config.image_token)
    document = {**asdict(config), "image_token": token}
    has_adapter = any(True for _ in lora_layers(model.language_model))
    writers = {VISION_WEIGHTS: lambda p: save_file(vision, str(p))}
    if config.base_model is not None:
        if not has_adapter:
            raise LmforgeError("a model over a named base is saved as its adapter, and this one has none")
        writers[ADAPTER_FOLDER] = lambda p: save_adapter(model.language_model, p, base_model=config.base_model)
    else:

        def write_language_model(p: Path) -> None:
            language_model = copy.deepcopy(model.language_model)
            save_model(p, remove_lora(language_model) if has_adapter else language_model, tokenizer)

        writers[LANGUAGE_MODEL_FOLDER] = write_language_model
    writers[CONFIG_FILE] = lambda p: p.write_text(json.dumps(document, indent=2) + "\n")
    return write_folder_atomically(path, writers)


def is_vlm_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def load_vlm(path: str | Path, device: str = "cpu") -> tuple[VisionLanguageModel, Tokenizer]:
    """A saved vision-language model (eval mode, adapters merged) and its tokenizer."""
    from safetensors.torch import load_file

    from lmforge.formats.checkpoint import load_model
    from lmforge.formats.loading import load

    folder = Path(path)
    try:
        document = json.loads((folder / CONFIG_FILE).read_text())
        config = VLMConfig(**document)
    except FileNotFoundError:
        raise LmforgeError(f"{folder}: not a vision-language model folder (no {CONFIG_FILE})") from None
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise LmforgeError(f"{folder / CONFIG_FILE}: unreadable ({error})") from None
    if config.base_model is None:
        language_model, tokenizer, _ = load_model(folder / LANGUAGE_MODEL_FOLDER)
    else:
        language_model, tokenizer = load(config.base_model, keep_quantized=False, adapter=folder / ADAPTER_FOLDER)
    _, image_token_id = image_token_for(tokenizer, config.image_token)
    model = VisionLanguageModel(config, language_model, image_token_id)
    weights = load_file(str(folder / VISION_WEIGHTS))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [name for name in missing if not name.startswith("language_model.")]
    if missing or unexpected:
        raise LmforgeError(f"{folder / VISION_WEIGHTS}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device).eval(), tokenizer


__all__ = [
    "VLMConfig",
    "VisionLanguageModel",
    "preprocess_image",
    "generate_with_images",
    "save_vlm",
    "load_vlm",
    "train_vision_chat",
]
