"""Offline data for the vision-language model: digit images and Pillow-rendered scenes of coloured
shapes, each with a question/answer chat.

Scenes are a 3x3 grid of cells; each object (a red, green, blue or yellow circle, square or triangle)
fills one cell, so "at the top left" names a cell exactly. Three kinds of question, each with
training phrasings and a held-out one (never trained on):
    digit     "What digit is this?"               → "The digit is 7."
    count     "How many red circles are there?"   → "There are 2."
    describe  "Describe the image."               → "A red circle at the top left, a blue square at the center."
The held-out split is other images (the digits' test split, scenes from another seed) asked in every
phrasing; `score_answer` says whether a reply answers right, the same for a model and a baseline.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
GRID = 3  # cells per side
SCENE_SIZE = 48  # pixels per side of a rendered scene: 16 per cell
MAX_OBJECTS = 3  # a description of three objects is ~30 tokens; training cost grows with every token

QUESTION_TYPES = ("digit", "count", "describe")
TRAINING_QUESTIONS = {
    "digit": ("What digit is this?", "Which digit is shown?", "What number is written here?"),
    "count": ("How many {colour} {shape}s are there?", "Count the {colour} {shape}s."),
    "describe": ("Describe the image.", "What is in the picture?"),
}
HELD_OUT_QUESTIONS = {
    "digit": ("Which digit do you see?",),
    "count": ("What is the number of {colour} {shape}s?",),
    "describe": ("What do you see?",),
}


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    cell: int  # 0..8, row by row from the top left


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # in cell order

    def count(self, colour: str, shape: str) -> int:
        return sum(o.colour == colour and o.shape == shape for o in self.objects)

    def description(self) -> str:
        """Every object in cell order: "A red circle at the top left, a blue square at the center."."""
        parts = [f"a {o.colour} {o.shape} at the {POSITIONS[o.cell]}" for o in self.objects]
        text = ", ".join(parts)
        return text[:1].upper() + text[1:] + "."


def random_scene(rng: random.Random) -> Scene:
    """One to three copies of one kind of object (so counts above one are common) and up to
    MAX_OBJECTS in all, in distinct cells."""
    copies = rng.randint(1, 3)
    others = rng.randint(0, MAX_OBJECTS - copies)
    cells = rng.sample(range(GRID * GRID), copies + others)
    repeated = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
    kinds = [repeated] * copies + [(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(others)]
    objects = [SceneObject(colour, shape, cell) for (colour, shape), cell in zip(kinds, cells)]
    return Scene(tuple(sorted(objects, key=lambda o: o.cell)))


def render_scene(scene: Scene, rng: random.Random | None = None, size: int = SCENE_SIZE) -> Image.Image:
    """The scene as an RGB image on black; with `rng`, each shape's size, place and shade vary a little."""
    rng = rng or random.Random(0)
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    cell = size / GRID
    for obj in scene.objects:
        row, column = divmod(obj.cell, GRID)
        margin = cell * rng.uniform(0.12, 0.22)
        dx, dy = (rng.uniform(-1, 1) * cell * 0.06 for _ in range(2))
        left, top = column * cell + margin + dx, row * cell + margin + dy
        right, bottom = (column + 1) * cell - margin + dx, (row + 1) * cell - margin + dy
        colour = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[obj.colour])
        if obj.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=colour)
        elif obj.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=colour)
        else:
            draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=colour)
    return image


def digit_image(pixels) -> Image.Image:
    """An 8x8 digit (values in [0, 1], as `vision.load_digits_split` gives) as a grey PIL image."""
    values = [int(round(float(v) * 255)) for v in pixels.reshape(-1)]
    image = Image.new("L", (8, 8))
    image.putdata(values)
    return image


@dataclass
class VisionChat:
    """One image, a question about it and the right answer, as a chat."""

    image: Image.Image
    question_type: str
    question: str
    answer: str
    truth: object  # what `score_answer` compares with: a digit, a count, or the scene's objects
    scene: Scene | None = None  # what a scene image shows (None for a digit)

    def messages(self) -> list[dict]:
        """The chat, the image as an OpenAI-style content part before the question."""
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question}]}
        return [user, {"role": "assistant", "content": self.answer}]


def digit_chat(pixels, label: int, question: str) -> VisionChat:
    return VisionChat(digit_image(pixels), "digit", question, f"The digit is {label}.", label)


def count_chat(scene: Scene, image: Image.Image, colour: str, shape: str, question: str) -> VisionChat:
    n = scene.count(colour, shape)
    answer = f"There {'is' if n == 1 else 'are'} {n}."
    return VisionChat(image, "count", question.format(colour=colour, shape=shape), answer, n, scene)


def describe_chat(scene: Scene, image: Image.Image, question: str) -> VisionChat:
    return VisionChat(image, "describe", question, scene.description(), scene.objects, scene)


def vision_chats(count: int, split: str = "train", seed: int = 0, held_out_questions: bool = False) -> list[VisionChat]:
    """`count` chats, a third of each question type, in a seeded random order. `split`: "train" or
    "test" (the digits' test split and scenes from another seed: images never trained on).
    `held_out_questions`: ask in the held-out phrasings instead of the training ones."""
    from lmforge.apps.vision import load_digits_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{split}-{seed}")
    questions = HELD_OUT_QUESTIONS if held_out_questions else TRAINING_QUESTIONS
    train_x, train_y, test_x, test_y = load_digits_split()
    digits_x, digits_y = (train_x, train_y) if split == "train" else (test_x, test_y)
    chats = []
    for index in range(count):
        kind = QUESTION_TYPES[index % len(QUESTION_TYPES)]
        if kind == "digit":
            which = rng.randrange(len(digits_y))
            chats.append(digit_chat(digits_x[which, 0], int(digits_y[which]), rng.choice(questions["digit"])))
            continue
        scene = random_scene(rng)
        image = render_scene(scene, rng)
        if kind == "count":
            # mostly the kind the scene repeats, else any kind (often absent: a count of 0)
            asked = rng.choice(scene.objects) if rng.random() < 0.75 else None
            colour, shape = (asked.colour, asked.shape) if asked else (rng.choice(list(COLOURS)), rng.choice(SHAPES))
            chats.append(count_chat(scene, image, colour, shape, rng.choice(questions["count"])))
        else:
            chats.append(describe_chat(scene, image, rng.choice(questions["describe"])))
    rng.shuffle(chats)
    return chats


_OBJECT_PATTERN = re.compile(
    rf"({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) at the ({'|'.join(sorted(POSITIONS, key=len, reverse=True))})"
)


def parse_description(text: str) -> set[tuple[str, str, int]]:
    """(colour, shape, cell) of every object a description names."""
    return {(c, s, POSITIONS.index(p)) for c, s, p in _OBJECT_PATTERN.findall(text.lower())}


def description_matches(chat: VisionChat, reply: str) -> dict[str, int]:
    """How far a reply to a describe question is right, object by object: `named` objects in the reply,
    `truth` in the scene, `placed` named with the right colour, shape and cell, `kinds` named with the
    right colour and shape wherever (as many as the scene has of each, at most)."""
    from collections import Counter

    named = _OBJECT_PATTERN.findall(reply.lower())
    truth = {(o.colour, o.shape, o.cell) for o in chat.truth}
    kinds = Counter((c, s) for c, s, _ in named) & Counter((o.colour, o.shape) for o in chat.truth)
    return {
        "named": len(named),
        "truth": len(truth),
        "placed": len(parse_description(reply) & truth),
        "kinds": sum(kinds.values()),
    }


def score_answer(chat: VisionChat, reply: str) -> bool:
    """Whether `reply` answers `chat`'s question right: the digit or count as its first number, a
    description naming exactly the scene's objects (colour, shape and position each)."""
    if chat.question_type == "describe":
        return parse_description(reply) == {(o.colour, o.shape, o.cell) for o in chat.truth}
    number = re.search(r"\d+", reply)
    return number is not None and int(number.group()) == chat.truth
