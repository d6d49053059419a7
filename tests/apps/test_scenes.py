import random

from lmforge.apps import scenes
from lmforge.apps.scenes import COLOURS, GRID, SCENE_SIZE, Scene, SceneObject


def test_a_description_names_exactly_the_scene_objects():
    rng = random.Random(0)
    for _ in range(200):
        scene = scenes.random_scene(rng)
        assert 1 <= len(scene.objects) <= scenes.MAX_OBJECTS
        assert len({o.cell for o in scene.objects}) == len(scene.objects)  # one object a cell
        named = scenes.parse_description(scene.description())
        assert named == {(o.colour, o.shape, o.cell) for o in scene.objects}


def test_render_puts_each_colour_in_its_cell_and_leaves_the_rest_black():
    scene = Scene((SceneObject("red", "square", 0), SceneObject("blue", "circle", 4)))
    image = scenes.render_scene(scene, random.Random(0))
    cell = SCENE_SIZE // GRID
    centre = lambda index: (index % GRID * cell + cell // 2, index // GRID * cell + cell // 2)  # noqa: E731
    red, blue = image.getpixel(centre(0)), image.getpixel(centre(4))
    assert red[0] > 150 and red[2] < 100
    assert blue[2] > 150 and blue[0] < 100
    assert image.getpixel(centre(8)) == (0, 0, 0)
    assert sum(image.getpixel((x, y)) != (0, 0, 0) for x in range(cell) for y in range(cell)) > 40


def test_count_and_describe_answers_are_scored_against_the_scene():
    scene = Scene((SceneObject("red", "circle", 0), SceneObject("red", "circle", 2), SceneObject("green", "square", 5)))
    image = scenes.render_scene(scene)
    chat = scenes.count_chat(scene, image, "red", "circle", "How many {colour} {shape}s are there?")
    assert chat.question == "How many red circles are there?" and chat.answer == "There are 2."
    assert scenes.score_answer(chat, "There are 2.") and not scenes.score_answer(chat, "There is 1.")
    assert not scenes.score_answer(chat, "I cannot tell.")
    assert scenes.count_chat(scene, image, "blue", "circle", "{colour} {shape}").answer == "There are 0."
    described = scenes.describe_chat(scene, image, "Describe the image.")
    assert (
        described.answer == "A red circle at the top left, a red circle at the top right, a green square at the right."
    )
    assert scenes.score_answer(described, described.answer)
    assert not scenes.score_answer(described, "A red circle at the top left, a red circle at the top right.")
    assert not scenes.score_answer(described, described.answer.replace("green", "blue"))


def test_descriptions_are_scored_object_by_object():
    scene = Scene((SceneObject("red", "circle", 0), SceneObject("red", "circle", 2), SceneObject("green", "square", 5)))
    chat = scenes.describe_chat(scene, scenes.render_scene(scene), "Describe the image.")
    assert scenes.description_matches(chat, chat.answer) == {"named": 3, "truth": 3, "placed": 3, "kinds": 3}
    reply = "A red circle at the top left, a red circle at the bottom, a red circle at the center, "
    reply += "a blue square at the right."
    # one placed right; two red circles of the kind (the scene has two), the third and the blue square not
    assert scenes.description_matches(chat, reply) == {"named": 4, "truth": 3, "placed": 1, "kinds": 2}
    assert scenes.description_matches(chat, "I see nothing.") == {"named": 0, "truth": 3, "placed": 0, "kinds": 0}


def test_chats_mix_question_types_and_keep_test_images_and_questions_apart():
    train = scenes.vision_chats(30, "train", seed=0)
    assert [c.question_type for c in train].count("digit") == 10
    assert {c.question_type for c in train} == set(scenes.QUESTION_TYPES)
    assert [c.answer for c in train] == [c.answer for c in scenes.vision_chats(30, "train", seed=0)]
    test = scenes.vision_chats(30, "test", seed=0)
    train_images = {c.image.tobytes() for c in train}
    assert not any(c.image.tobytes() in train_images for c in test)
    held_out = scenes.vision_chats(30, "test", held_out_questions=True)
    training_questions = {q for qs in scenes.TRAINING_QUESTIONS.values() for q in qs}
    assert not any(c.question in training_questions for c in held_out if c.question_type != "count")
    for chat in train:
        assert scenes.score_answer(chat, chat.answer)
        user, assistant = chat.messages()
        assert user["content"][0] == {"type": "image"} and assistant["content"] == chat.answer
        if chat.question_type == "digit":
            assert chat.image.size == (8, 8) and chat.scene is None
        else:
            assert chat.image.size == (SCENE_SIZE, SCENE_SIZE) and chat.scene is not None
    assert set(COLOURS) >= {o.colour for c in train if c.scene for o in c.scene.objects}
