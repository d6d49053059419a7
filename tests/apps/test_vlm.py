import io
import json

import pytest
import torch
from PIL import Image

from lmforge.apps import scenes, vlm
from lmforge.errors import LmforgeError
from lmforge.finetune.sft import IGNORE
from lmforge.formats.checkpoint import save_model
from lmforge.model import ModelConfig, Transformer
from lmforge.settings import LLAMA_SWITCHES, SamplingConfig, VisionChatConfig
from lmforge.tokenizer import DEFAULT_SPECIAL_TOKENS, CharTokenizer

CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?':\n"
TOKENIZER = CharTokenizer(CHARS, special_tokens=(*DEFAULT_SPECIAL_TOKENS, "<image>"))
IMAGE_ID = TOKENIZER.token_to_id("<image>")
# A small encoder and projector: 3x3 patches (one per scene cell) of 8 pixels, so 10 image tokens
SMALL = dict(base_model=None, image_size=24, patch_size=8, vision_layers=1, vision_d_model=32, projector_hidden=32)


def tiny_language_model(seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=TOKENIZER.vocab_size, block_size=512, n_layers=2, n_heads=4, n_kv_heads=2, d_model=48,
        **LLAMA_SWITCHES,
    )  # fmt: skip
    return Transformer(config).eval()


def tiny_vlm(seed=0, lora=True):
    config = vlm.VLMConfig(**SMALL, lora_rank=4)
    if lora:
        model = vlm.build_vision_language_model(tiny_language_model(seed), TOKENIZER, config, seed)
    else:
        model = vlm.VisionLanguageModel(config, tiny_language_model(seed), IMAGE_ID)
    with torch.no_grad():  # LoRA's B starts at zero; make the adapters and projector matter
        for name, parameter in model.named_parameters():
            if "lora_b" in name or name.startswith("projector"):
                parameter.normal_(0, 0.2)
    return model.eval()


def pictures(count, seed=0):
    return [chat.image for chat in scenes.vision_chats(count * 3, "train", seed)[:count]]


def test_projector_gives_tokens_per_image_vectors_in_the_language_models_width():
    model = tiny_vlm()
    assert model.tokens_per_image == 1 + (24 // 8) ** 2 + 3 * len(vlm.KINDS)  # class, patches, 3 per kind
    images = torch.rand(3, 3, 24, 24)
    assert model.image_embeddings(images).shape == (3, model.tokens_per_image, 48)
    assert model.preprocess_image(Image.new("L", (8, 8), 255)).shape == (3, 24, 24)
    assert torch.all(model.preprocess_image(Image.new("L", (8, 8), 255)) == 1)


def test_input_embeddings_put_each_images_tokens_at_its_placeholders_in_order():
    model = tiny_vlm()
    n = model.tokens_per_image
    text = TOKENIZER.encode("ab")
    tokens = torch.tensor([text + [IMAGE_ID] * n + text + [IMAGE_ID] * n])
    images = torch.rand(2, 3, 24, 24)
    x = model.input_embeddings(tokens, images)
    expected = model.image_embeddings(images)
    assert torch.allclose(x[0, 2 : 2 + n], expected[0])
    assert torch.allclose(x[0, 4 + n :], expected[1])
    assert torch.equal(x[0, :2], model.language_model.embed(torch.tensor(text)))
    with pytest.raises(LmforgeError, match="image placeholder"):
        model.input_embeddings(tokens, images[:1])


def test_prompt_ids_place_the_image_tokens_where_the_image_part_is():
    model = tiny_vlm()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what digit?"}]}]
    ids, count = vlm.vision_prompt_ids(model, TOKENIZER, messages)
    assert count == 1
    first = ids.index(IMAGE_ID)
    assert ids[first : first + model.tokens_per_image] == [IMAGE_ID] * model.tokens_per_image
    assert ids.count(IMAGE_ID) == model.tokens_per_image
    before = TOKENIZER.decode(ids[:first])
    assert before.endswith("<|im_start|>user\n") and vlm.DEFAULT_SYSTEM_PROMPT in before
    assert TOKENIZER.decode(ids[first + model.tokens_per_image :]) == "\nwhat digit?<|im_end|>\n<|im_start|>assistant\n"
    # typed text cannot make an image slot, nor a content part of an unknown kind
    with pytest.raises(LmforgeError, match="marks an image"):
        vlm.vision_prompt_ids(model, TOKENIZER, [{"role": "user", "content": "x\ue002"}])
    with pytest.raises(LmforgeError, match="content parts"):
        vlm.vision_prompt_ids(model, TOKENIZER, [{"role": "user", "content": [{"type": "audio"}]}])


def test_only_the_assistants_tokens_are_scored():
    model = tiny_vlm()
    chats = scenes.vision_chats(6, "train")
    (tokens, images, scored), targets = vlm.chat_rows(model, TOKENIZER, chats)
    assert images.shape == (6, 3, 24, 24) and torch.equal(scored, targets != IGNORE)
    for row, chat in enumerate(chats):
        answer = TOKENIZER.decode(targets[row][targets[row] != IGNORE].tolist())
        assert answer == chat.answer + "<|im_end|>\n"  # the turn as the template ends it, as SFT scores it
        assert int((tokens[row] == IMAGE_ID).sum()) == model.tokens_per_image
    (text_tokens, _, _), text_targets = vlm.chat_rows(model, TOKENIZER, chats, text_only=True)
    assert not (text_tokens == IMAGE_ID).any() and int((text_targets != IGNORE).sum()) == int(scored.sum())


def test_without_images_the_logits_are_the_plain_models():
    model = tiny_vlm(lora=False)
    tokens = torch.tensor([TOKENIZER.encode("how many red circles?")])
    assert torch.equal(model(tokens, None), model.language_model(tokens)[0])


def test_generation_with_the_cache_matches_recomputing_the_whole_sequence():
    from lmforge.inference.generate import generate_tokens

    model = tiny_vlm()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}]
    ids, _ = vlm.vision_prompt_ids(model, TOKENIZER, messages)
    with torch.no_grad():
        embeddings = model.input_embeddings(torch.tensor([ids]), vlm.as_pixels(model, pictures(1)))
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=12)
    cached = list(generate_tokens(model.language_model, ids, sampling, prompt_embeddings=embeddings))
    recomputed = list(generate_tokens(model.language_model, ids, sampling, False, prompt_embeddings=embeddings))
    assert cached == recomputed
    other = list(generate_tokens(model.language_model, ids, sampling, prompt_embeddings=embeddings * 0))
    assert other != cached  # the image tokens matter


def test_save_and_load_give_the_same_replies(tmp_path):
    model = tiny_vlm()
    image = pictures(1)[0]
    reply = vlm.answer(model, TOKENIZER, image, "How many red circles are there?", 16)
    vlm.save_vlm(model, TOKENIZER, tmp_path / "vlm")
    loaded, tokenizer = vlm.load_vlm(tmp_path / "vlm")
    assert vlm.answer(loaded, tokenizer, image, "How many red circles are there?", 16) == reply
    tokens = torch.tensor([[*TOKENIZER.encode("ab"), *[IMAGE_ID] * model.tokens_per_image]])
    pixels = vlm.as_pixels(model, [image])
    with torch.no_grad():
        assert torch.allclose(loaded(tokens, pixels), model(tokens, pixels), atol=1e-5)
    with pytest.raises(LmforgeError, match="image parts"):
        list(vlm.generate_with_images(loaded, tokenizer, [{"role": "user", "content": "hi"}], [image]))
    with pytest.raises(LmforgeError, match="not a vision-language model"):
        vlm.load_vlm(tmp_path)


def test_encoder_pretraining_loss_skips_what_does_not_apply():
    outputs = torch.randn(2, 10 + 4 * vlm.CELL_CLASSES)  # the loss takes any number of cells
    targets = torch.tensor([[3, IGNORE, IGNORE, IGNORE, IGNORE], [IGNORE, 0, 5, 0, 12]])
    losses = vlm.encoder_pretraining_loss(outputs, targets)
    digit = torch.nn.functional.cross_entropy(outputs[:1, :10], targets[:1, 0])
    cells = torch.nn.functional.cross_entropy(outputs[1, 10:].reshape(4, -1), targets[1, 1:])
    assert torch.allclose(losses, torch.stack([digit, cells]), atol=1e-6)


def test_the_count_part_of_the_pretraining_loss_is_each_kinds_cross_entropy():
    chats = scenes.vision_chats(6, "train")
    scene_chat = next(c for c in chats if c.scene is not None)
    digit_chat = next(c for c in chats if c.scene is None)
    counts = vlm.count_labels(scene_chat)
    assert sum(counts) == len(scene_chat.scene.objects) and vlm.count_labels(digit_chat) == [IGNORE] * len(vlm.KINDS)
    kinds, cells = len(vlm.KINDS), 9
    outputs = torch.randn(2, 10 + cells * vlm.CELL_CLASSES + kinds * vlm.COUNTS)
    targets = torch.tensor(
        [[IGNORE, *vlm.cell_labels(scene_chat), *counts], [digit_chat.truth, *[IGNORE] * (cells + kinds)]]
    )
    losses = vlm.encoder_pretraining_loss(outputs, targets)
    cell_logits = outputs[0, 10 : 10 + cells * vlm.CELL_CLASSES].reshape(cells, -1)
    cell_loss = torch.nn.functional.cross_entropy(cell_logits, targets[0, 1 : 1 + cells])
    count_logits = outputs[0, -kinds * vlm.COUNTS :].reshape(kinds, vlm.COUNTS)
    count_loss = torch.nn.functional.cross_entropy(count_logits, torch.tensor(counts))
    digit_loss = torch.nn.functional.cross_entropy(outputs[1:, :10], targets[1:, 0])
    assert torch.allclose(losses, torch.stack([cell_loss + count_loss, digit_loss]), atol=1e-5)


def test_grounded_count_tokens_are_their_kinds_words_then_the_counted_number():
    model = tiny_vlm()
    model.__dict__["label_heads"] = (torch.nn.Linear(32, 10), torch.nn.Linear(32, vlm.CELL_CLASSES))
    vlm.ground_projector(model, TOKENIZER)
    with torch.no_grad():  # a count head sure that there are (kind index) % COUNTS of each kind
        model.counter.head.weight.zero_()
        bias = torch.full((len(vlm.KINDS), vlm.COUNTS), -30.0)
        bias[torch.arange(len(vlm.KINDS)), torch.arange(len(vlm.KINDS)) % vlm.COUNTS] = 30.0
        model.counter.head.bias.copy_(bias.flatten())
        tokens = model.image_embeddings(torch.rand(1, 3, 24, 24))[0]
    assert tokens.shape[0] == model.tokens_per_image
    word = lambda text: vlm.word_embedding(model, TOKENIZER, text)  # noqa: E731
    for index, (colour, shape) in enumerate(vlm.KINDS):
        expected = torch.stack([word(colour), word(f"{shape}s"), word(str(index % vlm.COUNTS))])
        first = 1 + 9 + 3 * index  # after the class and patch tokens
        assert torch.allclose(tokens[first : first + 3], expected, atol=1e-4)
    # each patch token carries its cell's place in words
    assert torch.allclose(model.patch_positions[0], vlm.phrase_embedding(model, TOKENIZER, "top left"))


def tiny_base(folder):
    return save_model(folder, tiny_language_model(), TOKENIZER)


def test_training_end_to_end_learns_and_writes_a_loadable_model(tmp_path):
    base = tiny_base(tmp_path / "base")
    config = VisionChatConfig(
        model=str(base), out=str(tmp_path / "run"), train_chats=12, validation_chats=3, epochs=2, batch_size=4,
        learning_rate=1e-2, lora_rank=4, encoder_images=12, encoder_epochs=1,
    )  # fmt: skip
    result = vlm.train_vision_chat(config, verbose=0, vlm_config=vlm.VLMConfig(**{**SMALL, "base_model": None}))
    losses = result["history"]["loss"]
    assert losses[-1] < losses[0]
    assert set(result["encoder"]) == {"digit_accuracy", "cell_accuracy", "count_accuracy"}
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["train_chats"] == 12 and not (tmp_path / "run" / "training_state.pt").exists()
    loaded, tokenizer = vlm.load_vlm(tmp_path / "run" / "vlm")
    assert (tmp_path / "run" / "vlm" / vlm.ADAPTER_FOLDER).is_dir()  # over the named base: the adapter only
    image = pictures(1)[0]
    model = result["model"]
    assert vlm.answer(loaded, tokenizer, image, "Describe the image.", 12) == vlm.answer(
        model, TOKENIZER, image, "Describe the image.", 12
    )


def test_chat_with_image_answers_as_the_library_does(tmp_path, monkeypatch):
    from lmforge.cli import main
    from lmforge.inference import chat as chat_module

    model = tiny_vlm()
    vlm.save_vlm(model, TOKENIZER, tmp_path / "vlm")
    image = pictures(1)[0]
    image.save(tmp_path / "scene.png")
    expected = vlm.answer(model, TOKENIZER, image, "How many red circles are there?", 6)
    lines, shown = iter(["How many red circles are there?", "/exit"]), io.StringIO()
    loop = chat_module.chat_loop
    monkeypatch.setattr(chat_module, "chat_loop", lambda session: loop(session, lambda _: next(lines), shown))
    assert main(["chat", str(tmp_path / "vlm"), "--image", str(tmp_path / "scene.png"), "--max-new-tokens=6"]) == 0
    assert f"assistant> {expected}\n" in shown.getvalue()


def test_chat_image_errors_are_one_line(tmp_path, capsys):
    from lmforge.cli import main

    (tmp_path / "not-an-image.png").write_text("hello")
    vlm.save_vlm(tiny_vlm(), TOKENIZER, tmp_path / "vlm")
    assert main(["chat", str(tmp_path / "vlm"), "--image", str(tmp_path / "not-an-image.png")]) == 2
    assert "not-an-image.png: not a readable image" in capsys.readouterr().err
    assert main(["chat", str(tmp_path), "--image", str(tmp_path / "not-an-image.png")]) == 2
    assert "--image needs a vision-language model folder" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_vision_chat_from_the_cli_writes_a_model_chat_can_load(tmp_path, capsys):
    from lmforge.cli import main

    base = tiny_base(tmp_path / "base")
    out = tmp_path / "run"
    args = ["finetune", "--task", "vision-chat", "--model", str(base), "--out", str(out), "--train-chats=12"]
    args += ["--validation-chats=0", "--batch-size=4", "--encoder-images=20", "--encoder-epochs=1", "--lora-rank=2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'vlm'}" in printed and "image encoder: digit accuracy" in printed
    model, _ = vlm.load_vlm(out / "vlm")
    assert model.config.base_model == str(base) and model.config.lora_rank == 2
    assert main(args) == 2  # the folder holds a run
    assert "already holds a run" in capsys.readouterr().err


def test_vision_chat_sharded_over_two_processes_writes_what_one_process_writes(tmp_path):
    """`finetune --task vision-chat --parallel fsdp --activation-checkpointing` on 2 gloo processes against
    one process: the same losses and the same checkpoint. Stage 1 does not train here: the gradient of
    the ViT's key biases is zero but for rounding (softmax ignores a shift shared by all keys), and Adam
    scales that noise, different for one process and two, into steps of ~5e-5. Its grounding of the
    projector runs as in one process."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    base = tiny_base(tmp_path / "base")
    settings = {"train_chats": 9, "validation_chats": 3, "batch_size": 4, "encoder_images": 20, "encoder_epochs": 0,
                "lora_rank": 2, "learning_rate": 1e-2, "epochs": 2, "checkpoint_interval": 1}  # fmt: skip
    config = VisionChatConfig(model=str(base), out=str(tmp_path / "one"), parallel="fsdp", **settings)
    one = vlm.train_vision_chat(config, verbose=0)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmforge",
               "finetune", "--task", "vision-chat", "--model", str(base), "--out", str(tmp_path / "two"),
               "--parallel", "fsdp", "--activation-checkpointing",
               *(f"--{key}={value}" for key, value in settings.items())]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"},
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fsdp over 2 processes" in run.stdout and run.stdout.count("wrote ") == 1
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for key in ("digit_accuracy", "cell_accuracy", "count_accuracy"):
        assert two["encoder"][key] == pytest.approx(one["encoder"][key], abs=1e-6), key
    for key in ("loss", "val_loss"):
        assert len(one["history"][key]) == 2
        assert two["history"][key] == pytest.approx(one["history"][key], abs=1e-5), key
    for written in (vlm.VISION_WEIGHTS, f"{vlm.ADAPTER_FOLDER}/adapter.safetensors"):
        one_weights, two_weights = (load_file(tmp_path / run / "vlm" / written) for run in ("one", "two"))
        assert one_weights.keys() == two_weights.keys()
        for name, weight in one_weights.items():
            torch.testing.assert_close(two_weights[name], weight, atol=1e-5, rtol=1e-5, msg=name)
    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == ["encoder.safetensors", "metrics.json", "vlm"]


def test_the_grounded_projector_maps_each_label_to_its_words():
    model = tiny_vlm()
    digit_head, cell_head = torch.nn.Linear(32, 10), torch.nn.Linear(32, vlm.CELL_CLASSES)
    with torch.no_grad():  # heads that read feature i as label i
        digit_head.weight.copy_(torch.eye(32)[13:23]), digit_head.bias.zero_()
        cell_head.weight.copy_(torch.eye(32)[: vlm.CELL_CLASSES]), cell_head.bias.zero_()
    model.__dict__["label_heads"] = (digit_head, cell_head)
    vlm.ground_projector(model, TOKENIZER)
    words = ["empty"] + [f"{colour} {shape}" for colour in scenes.COLOURS for shape in scenes.SHAPES]
    words += [str(digit) for digit in range(10)]
    embeddings = torch.stack([sum(vlm.word_embedding(model, TOKENIZER, w) for w in text.split()) for text in words])
    with torch.no_grad():
        for label in range(len(words)):
            out = model.projector(torch.eye(32)[label] * 20)  # a feature its head reads as `label`, strongly
            similarity = torch.nn.functional.cosine_similarity(out[None], embeddings)
            assert int(similarity.argmax()) == label and float(similarity[label]) > 0.9
