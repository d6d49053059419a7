"""Interpretability: attention maps from the model's own code, the logit lens, attributions, the explain page."""

import copy
import json
import math
from dataclasses import replace

import pytest
import torch

from lmforge.evaluation.interpret import (
    _next_token_logit,
    attention_maps,
    classifier_attributions,
    explain,
    explain_image,
    gradient_x_input,
    image_attention,
    integrated_gradients,
    logit_lens,
    mean_embedding_baseline,
    next_token_attributions,
    recording_attention,
)
from lmforge.finetune.classify import SequenceClassifier
from lmforge.model import ModelConfig, Transformer, apply_rope
from lmforge.settings import LLAMA_SWITCHES
from lmforge.tokenizer import CharTokenizer

from ..conftest import chromium_page

TOKENIZER = CharTokenizer("abcdefghijklmnopqrstuvwxyz ")
LLAMA = ModelConfig(
    vocab_size=TOKENIZER.vocab_size, block_size=64, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32,
    **LLAMA_SWITCHES,
)  # fmt: skip
TOKENS = torch.tensor(TOKENIZER.encode("the cat sat"))


def model_of(config=LLAMA, seed=0):
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():  # livelier than GPT-2's 0.02 init: attention patterns worth looking at
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.3)
    return model


def test_attention_rows_are_distributions_and_causal():
    maps = attention_maps(model_of(), TOKENS)
    length = len(TOKENS)
    assert maps.shape == (2, 4, length, length)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 4, length), atol=1e-5)
    assert (maps.triu(diagonal=1) == 0).all()


def test_recorded_maps_equal_a_manual_softmax_of_q_k():
    model = model_of()
    maps = attention_maps(model, TOKENS)
    attention = model.blocks[0].attention
    with torch.no_grad():
        x = model.blocks[0].attention_norm(model.token_embedding(TOKENS[None]))
        q, k, _ = attention.qkv(x).split([4 * 8, 2 * 8, 2 * 8], dim=-1)
        length = len(TOKENS)
        q = q.view(1, length, 4, 8).transpose(1, 2)
        k = k.view(1, length, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
        rope = (model.rope_cos[:length], model.rope_sin[:length])
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        scores = q @ k.transpose(-2, -1) / math.sqrt(8)
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
        expected = scores.softmax(-1)[0]
    assert torch.allclose(maps[0], expected, atol=1e-5)


def test_recording_changes_no_output_and_is_off_afterwards():
    model = model_of()
    with torch.no_grad():
        plain = model(TOKENS[None])[0]
        with recording_attention(model) as records:
            recorded = model(TOKENS[None])[0]
    assert torch.allclose(plain, recorded, atol=1e-5) and len(records) == 2 and len(records[0]) == 1
    assert all(block.attention.attention_record is None for block in model.blocks)


def test_logit_lens_last_layer_is_the_models_own_prediction():
    model = model_of()
    rows = logit_lens(model, TOKENS, top_k=3)
    assert [row["layer"] for row in rows] == [0, 1, 2]
    with torch.no_grad():
        probabilities = model(TOKENS[None])[0][0, -1].softmax(-1)
    assert rows[-1]["top_ids"][0] == int(probabilities.argmax())
    assert rows[-1]["final_choice_probability"] == pytest.approx(float(probabilities.max()), rel=1e-4)
    assert all(row["top_probabilities"] == sorted(row["top_probabilities"], reverse=True) for row in rows)


def embedding_all_mean(embedding: torch.nn.Embedding) -> torch.nn.Embedding:
    """An embedding table whose every row is the mean row: the model's plain forward then sees the baseline."""
    mean = embedding.weight.detach().mean(0, keepdim=True).expand_as(embedding.weight).clone()
    return torch.nn.Embedding.from_pretrained(mean)


def test_integrated_gradients_are_complete():
    model = model_of()
    target = 7
    attributions, chosen = next_token_attributions(model, TOKENS, target=target)
    assert chosen == target
    with torch.no_grad():
        logit = model(TOKENS[None])[0][0, -1, target]
        baseline_model = copy.deepcopy(model)
        baseline_model.token_embedding = embedding_all_mean(model.token_embedding)  # the LM head keeps its weights
        baseline = baseline_model(TOKENS[None])[0][0, -1, target]
        # The function attributions differentiate is that same logit, seen from the input embeddings.
        function = _next_token_logit(model, TOKENS, target)
        start = mean_embedding_baseline(model.token_embedding, len(TOKENS))
        assert torch.allclose(function(model.token_embedding(TOKENS[None]))[0], logit, atol=1e-5)
        assert torch.allclose(function(start)[0], baseline, atol=1e-5)
    # Sundararajan et al.'s completeness axiom: the attributions add up to f(x) - f(baseline).
    assert float(attributions.sum()) == pytest.approx(float(logit - baseline), rel=0.02, abs=1e-3)


def test_gradient_x_input_is_exact_for_a_linear_function():
    weights = torch.randn(5, 4)
    embeddings = torch.randn(1, 5, 4)
    function = lambda e: (e[0] * weights).sum()[None]  # noqa: E731
    assert torch.allclose(gradient_x_input(function, embeddings), (embeddings[0] * weights).sum(-1))
    assert torch.allclose(integrated_gradients(function, embeddings, steps=4), (embeddings[0] * weights).sum(-1))


def test_classifier_attributions_are_complete():
    torch.manual_seed(0)
    classifier = SequenceClassifier(model_of(), classes=2).eval()
    tokens = torch.tensor(TOKENIZER.encode("good film"))
    scores = classifier_attributions(classifier, tokens, label=1, steps=64)
    mask = torch.ones(1, len(tokens), dtype=torch.long)
    with torch.no_grad():
        logit = classifier(tokens[None], mask)[0, 1]
        baseline_classifier = copy.deepcopy(classifier)
        baseline_classifier.backbone.token_embedding = embedding_all_mean(classifier.backbone.token_embedding)
        baseline = baseline_classifier(tokens[None], mask)[0, 1]
    assert float(scores.sum()) == pytest.approx(float(logit - baseline), rel=0.02, abs=1e-3)


def test_explain_writes_pngs_json_and_a_page_that_works_in_chromium(tmp_path):
    model = model_of()
    summary = explain(model, TOKENIZER, "the cat sat", tmp_path / "out", top_k=3)
    out = tmp_path / "out"
    assert len(list((out / "attention").glob("attention_layer_*.png"))) == 2
    assert (out / "logit_lens.png").stat().st_size > 2_000
    saved = json.loads((out / "explain.json").read_text())
    assert saved["tokens"] == list("the cat sat") and len(saved["attributions"]["scores"]) == 11
    assert saved["prediction"] == summary["prediction"] and len(saved["logit_lens"]) == 3

    with chromium_page() as (page, errors):
        page.goto((out / "explain.html").as_uri())
        assert page.locator("#heads .head-row").count() == 4  # one line per head of layer 0
        assert page.locator("#lens tr").count() == 1 + 3  # header + one row per layer
        before = page.locator("#heads .head-row").first.inner_html()
        page.locator("#tokens .tok").nth(4).hover()  # "c": it attends over "the c", not the last token's view
        after = page.locator("#heads .head-row").first.inner_html()
        assert before != after
        page.select_option("#layer", "1")
        page.screenshot(path=str(tmp_path / "explain.png"), full_page=True)
    assert not errors, errors
    assert (tmp_path / "explain.png").stat().st_size > 5_000


def test_explain_off_a_terminal_prints_each_tokens_score_and_shows_progress(tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.formats.checkpoint import save_model

    save_model(tmp_path / "model", model_of(), TOKENIZER)
    out = tmp_path / "out"
    assert main(["explain", "--model", str(tmp_path / "model"), "--prompt", "the cat sat", "--out", str(out)]) == 0
    captured = capsys.readouterr()  # stdout and stderr are pipes here, not terminals
    saved = json.loads((out / "explain.json").read_text())
    (line,) = [line for line in captured.out.splitlines() if line.startswith("attributions")]
    assert line.endswith(", ".join(f"{t!r} {s:+.4f}" for t, s in zip(saved["tokens"], saved["attributions"]["scores"])))
    progress = captured.err.splitlines()
    passes, pngs = progress.index("integrated_gradients passes"), progress.index("attention PNGs, one per layer")
    assert progress[passes + 1].startswith("32/32 ━") and progress[pngs + 1].startswith("2/2 ━")


@pytest.mark.slow
def test_explain_smollm2_from_the_command_line(tmp_path):
    """The acceptance run: `lmforge explain --model smollm2-135m-instruct --prompt "The capital of France is"`."""
    from lmforge.cli import main

    out = tmp_path / "explain"
    assert (
        main(["explain", "--model", "smollm2-135m-instruct", "--prompt", "The capital of France is", "--out", str(out)])
        == 0
    )
    summary = json.loads((out / "explain.json").read_text())
    assert summary["prediction"] == " Paris"
    assert len(list((out / "attention").glob("*.png"))) == 30 and (out / "logit_lens.png").exists()
    assert summary["logit_lens"][-1]["top_tokens"][0] == " Paris"

    with chromium_page() as (page, errors):
        page.goto((out / "explain.html").as_uri())
        assert page.locator("#heads .head-row").count() == 9 and page.locator("#lens tr").count() == 1 + 31
        page.locator("#tokens .tok").nth(1).hover()
        page.screenshot(path=str(tmp_path / "explain.png"), full_page=True)
    assert not errors, errors


def test_sliding_layers_record_no_attention_outside_their_window():
    """Gemma 3 style: a sliding layer's query sees only its last `window` keys; the full layer sees them all,
    and the recorded maps are the ones the model's output comes from (its window and its own scale)."""
    config = replace(
        LLAMA, qk_norm=True, sliding_window=3, layer_types=["sliding", "full"], rope_local_theta=10000.0,
        attention_scale=0.3,
    )  # fmt: skip
    model = model_of(config)
    maps = attention_maps(model, TOKENS)
    length = len(TOKENS)
    with torch.no_grad():  # the recorded path (window, scale) computes what the model's own attention does
        plain = model(TOKENS[None])[0]
        with recording_attention(model):
            assert torch.allclose(model(TOKENS[None])[0], plain, atol=1e-5)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 4, length), atol=1e-5)
    outside = torch.ones(length, length, dtype=torch.bool).tril(-3)  # keys 3 or more positions back
    assert (maps[0][:, outside] == 0).all()
    assert (maps[1][:, outside] > 0).all()


# --- explain --image: where a vision-language model's answer looks ----------------------------------------------


def test_image_attention_is_the_attention_maps_mean_at_the_asked_positions():
    model = model_of()
    queries, keys = [5, 7, 10], [0, 2, 3]
    expected = attention_maps(model, TOKENS).mean((0, 1))[queries][:, keys]
    with torch.no_grad():
        embeddings = model.embed(TOKENS[None])
    assert torch.allclose(image_attention(model, TOKENS, embeddings, queries, keys), expected, atol=1e-6)


def test_explain_image_maps_the_answers_attention_over_the_patches(tmp_path):
    from PIL import Image

    from lmforge.apps import vlm

    from ..serve.test_images import VLM_TOKENIZER, picture, question, reference_reply, tiny_vlm

    model, image = tiny_vlm(count_tokens=True), picture(4).resize((96, 72))
    summary = explain_image(model, VLM_TOKENIZER, image, "what is this?", tmp_path / "out", max_new_tokens=6)
    assert summary["answer"] == reference_reply(model, question("what is this?", image), [image], 6)
    answer_ids = summary["answer_ids"]
    assert VLM_TOKENIZER.decode(answer_ids) == summary["answer"] and len(summary["answer_tokens"]) == 6

    # the same numbers from the model's own forward over the prompt and answer, recorded
    ids, _ = vlm.vision_prompt_ids(model, VLM_TOKENIZER, question("what is this?", image))
    image_positions = [p for p, t in enumerate(ids) if t == model.image_token_id]
    with torch.no_grad(), recording_attention(model.language_model) as records:
        model(torch.tensor([ids + answer_ids]), model.preprocess_image(image)[None])
    maps = torch.stack([record[-1][0] for record in records]).mean((0, 1))  # (T, T)
    chosen_at = maps[len(ids) - 1 : len(ids) - 1 + len(answer_ids)][:, image_positions]
    # the class token, 3x3 patches, then three count tokens (colour, shape, number) per kind of object (12)
    assert len(image_positions) == model.tokens_per_image == 1 + 9 + 3 * 12
    assert summary["image_tokens"]["positions"] == image_positions and summary["image_tokens"]["patch_grid"] == [3, 3]
    assert summary["image_attention_share"] == pytest.approx(chosen_at.sum(1).tolist(), abs=1e-5)
    assert summary["class_token_attention"] == pytest.approx(chosen_at[:, 0].tolist(), abs=1e-5)
    patches = torch.tensor(summary["patch_attention"])
    assert patches.shape == (6, 3, 3) and torch.allclose(patches.flatten(1), chosen_at[:, 1:10], atol=1e-5)
    assert torch.allclose(torch.tensor(summary["other_image_token_attention"]), chosen_at[:, 10:], atol=1e-5)

    with Image.open(tmp_path / "out" / "image_attention.png") as png:
        assert png.width > 300 and png.height > 200
        # the heatmap is drawn over the image: the PNG has many colours, not just the figure's white
        assert len(png.convert("RGB").getcolors(maxcolors=1_000_000)) > 100
    assert json.loads((tmp_path / "out" / "explain.json").read_text())["answer"] == summary["answer"]


def test_explain_image_from_the_command_line(tmp_path, capsys):
    from lmforge.apps import vlm
    from lmforge.cli import main

    from ..serve.test_images import VLM_TOKENIZER, picture, tiny_vlm

    vlm.save_vlm(tiny_vlm(), VLM_TOKENIZER, tmp_path / "vlm")
    picture(5).save(tmp_path / "scene.png")
    arguments = ["explain", "--model", str(tmp_path / "vlm"), "--prompt", "what is this?", "--out", str(tmp_path / "x")]
    assert main([*arguments, "--image", str(tmp_path / "scene.png"), "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "answer: " in printed and "attention on the image, per answer token: " in printed
    assert (tmp_path / "x" / "image_attention.png").stat().st_size > 5_000
    assert main([*arguments, "--image", str(tmp_path / "missing.png")]) == 2
    assert "missing.png: not a readable image" in capsys.readouterr().err
    (tmp_path / "notes.png").write_text("not an image")
    assert main([*arguments, "--image", str(tmp_path / "notes.png")]) == 2
    assert "notes.png: not a readable image" in capsys.readouterr().err
    arguments[2] = str(tmp_path)  # not a vision-language model folder
    assert main([*arguments, "--image", str(tmp_path / "scene.png")]) == 2
    assert "--image needs a vision-language model folder" in capsys.readouterr().err


def test_explain_image_answers_from_the_image_even_for_a_prompt_short_enough_for_a_native_prefill(tmp_path):
    """A prompt of 32 tokens (no system prompt, "hi"): the answer is the greedy one of the model's own forward over
    its input embeddings, not of the same tokens without the image's features (what a prefill from token ids
    alone, such as the native kernels' for short prompts, would give)."""
    from lmforge.apps import vlm
    from lmforge.tokenizer import stop_token_ids

    from ..serve.test_images import VLM_TOKENIZER, picture, question, tiny_vlm

    model = tiny_vlm()
    model.config = replace(model.config, system_prompt="")
    ids, _ = vlm.vision_prompt_ids(model, VLM_TOKENIZER, question("hi", picture(6)))
    assert len(ids) == 32
    pixels = model.preprocess_image(picture(6))[None]
    stops = set(stop_token_ids(VLM_TOKENIZER))

    def greedy(with_image: bool) -> list[int]:
        tokens = list(ids)
        for _ in range(6):
            inputs = torch.tensor([tokens])
            embeddings = model.input_embeddings(inputs, pixels) if with_image else model.language_model.embed(inputs)
            with torch.no_grad():
                token = int(model.language_model(inputs, embeddings=embeddings)[0][0, -1].argmax())
            if token in stops:
                break
            tokens.append(token)
        return tokens[len(ids) :]

    expected = greedy(with_image=True)
    assert expected != greedy(with_image=False)  # so an answer that ignored the image would show
    summary = explain_image(model, VLM_TOKENIZER, picture(6), "hi", tmp_path, max_new_tokens=6)
    assert summary["answer_ids"] == expected
