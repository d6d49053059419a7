"""The `lmforge` command: thin verbs that parse arguments, call the library and print."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import describe, merge, parse_overrides, read_config_file
from lmforge.errors import LmforgeError


def config_help(config, title: str = "config keys") -> str:
    """`--help`'s table of a config's keys, types and values; `config` is the very instance the verb
    starts from, so the defaults shown are the ones used."""
    rows = [(dashed(key), type_name, default) for key, type_name, default in describe(config)]
    width = max(len(key) for key, _, _ in rows)
    type_width = max(14, *(len(type_name) for _, type_name, _ in rows))
    return f"{title} (--key value or --key=value; in a --config file, key: value with underscores):\n" + "\n".join(
        f"  --{key:<{width}}  {type_name:<{type_width}} default {default}" for key, type_name, default in rows
    )


def dashed(name: str) -> str:
    """Options are shown with dashes (`--max-batch`); underscores (`--max_batch`, the config-file
    spelling) are accepted too: `main` turns them into dashes before parsing."""
    return name.replace("_", "-")


def config_values(config_file: str | None, extra: list[str]) -> dict:
    values = read_config_file(config_file) if config_file else {}
    return merge(values, parse_overrides(extra))


def command_prepare(args, extra) -> int:
    from lmforge.training.data import prepare
    from lmforge.training.recipes import RECIPES

    sources = list(args.sources)
    if args.recipe:
        if args.recipe not in RECIPES:
            raise LmforgeError(f"unknown recipe {args.recipe!r}; known recipes: {sorted(RECIPES)}")
        sources.append(RECIPES[args.recipe]())
    if not sources:
        raise LmforgeError("nothing to prepare: give text/JSONL files or folders, or --recipe shakespeare")
    manifest = prepare(
        sources,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        progress=_byte_progress(),
    )
    print(
        f"\n{args.out}: {manifest['splits']['train']['tokens']:,} train + {manifest['splits']['val']['tokens']:,} "
        f"val tokens, {manifest['tokenizer_kind']} tokenizer with {manifest['vocab_size']} tokens"
    )
    return 0


def _byte_progress():
    if not sys.stderr.isatty():
        return None

    def report(done: int, total: int) -> None:
        print(f"\rtokenizing {done / total:6.1%} of {total / 1e6:.1f} MB", end="", file=sys.stderr, flush=True)

    return report


def command_train(args, extra) -> int:
    from lmforge.settings import train_config_from

    values = config_values(args.config, extra)
    if args.resume:
        values["resume"] = True
    if args.overwrite:
        values["overwrite"] = True
    config = train_config_from(values)
    from lmforge.training.pretrain import train  # torch: once the config is known to be valid

    summary = train(config)
    print(json.dumps(summary, indent=2))
    return 0


def use_threads(threads: int | None) -> None:
    """`--threads`, else $LMFORGE_THREADS (checked now, before a model loads), else chosen while decoding."""
    from lmforge.inference.engine import set_decode_threads, threads_from_environment

    set_decode_threads(threads or threads_from_environment())


def inference_device(name: str) -> str:
    """`--device` of the verbs that run a model: cpu, auto, cuda (this process's GPU) or cuda:N."""
    from lmforge.training.pretrain import resolve_device

    return str(resolve_device(name))


def command_generate(args, extra) -> int:
    from lmforge.config import apply_values
    from lmforge.settings import SamplingConfig

    values = config_values(args.config, extra)
    if args.draft:  # speculative decoding is greedy: the default, and an error (before any output) otherwise
        values.setdefault("temperature", 0)
    if args.json_schema:
        values["json_schema"] = read_json_schema(args.json_schema)
    sampling = apply_values(SamplingConfig(), values)
    from lmforge.formats.loading import load
    from lmforge.inference.generate import (  # torch: once the settings are known to be valid
        check_greedy_for_draft,
        generate,
    )

    if args.draft:
        check_greedy_for_draft(sampling)
    device = inference_device(args.device)
    if args.draft and device != "cpu":
        raise LmforgeError("--draft runs on the CPU only for now (speculative decoding keeps its caches there)")
    use_threads(args.threads)
    model, tokenizer = load(args.model, device=device, adapter=args.adapter)
    draft = None
    if args.draft:
        draft, draft_tokenizer = load(args.draft)
        sample = "Hello, world"
        same_tokens = draft_tokenizer.encode(sample) == tokenizer.encode(sample)
        if draft_tokenizer.vocab_size != tokenizer.vocab_size or not same_tokens:
            raise LmforgeError(f"--draft {args.draft} does not share {args.model}'s tokenizer")
    prompt = args.prompt if args.prompt is not None else ""
    sys.stdout.write(prompt)
    wrote_text = False
    for piece in generate(model, tokenizer, prompt, sampling, draft=draft, draft_tokens=args.draft_tokens):
        sys.stdout.write(piece)
        sys.stdout.flush()
        wrote_text = True
    sys.stdout.write("\n")
    if not wrote_text and sampling.max_new_tokens > 0:
        ended_by = "end-of-text" + (" or a stop string" if sampling.stop else "")
        print(f"(the model generated no text: its first token was {ended_by})", file=sys.stderr)
    return 0


def read_json_schema(path: str) -> dict:
    """`--json-schema FILE`: the JSON Schema in FILE, checked (llguidance compiles it) before a model loads."""
    from lmforge.settings import SamplingConfig

    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"--json-schema {path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise LmforgeError(f"--json-schema {path}: not a readable JSON file ({error})") from None
    try:
        SamplingConfig(json_schema=schema)
    except ValueError as error:
        raise LmforgeError(f"--json-schema {path}: {error}") from None
    return schema


def command_eval(args, extra) -> int:
    from lmforge.evaluation import evaluate
    from lmforge.formats.loading import load
    from lmforge.training.data import TokenDataset

    if args.compare:
        print(evaluate.compare_reports(args.compare), end="")
        return 0
    if not args.model:
        raise LmforgeError("eval needs --model (or --compare RESULT RESULT ...)")
    if not (args.data_dir or args.text or args.task):
        raise LmforgeError("nothing to evaluate: give --data-dir, --text FILE and/or --task FILE.jsonl")
    model, tokenizer = load(args.model, device=inference_device(args.device))
    metrics = {}
    if args.data_dir:
        dataset = TokenDataset(args.data_dir, args.split)
        data_tokenizer = dataset.tokenizer()
        if data_tokenizer.vocab_size != tokenizer.vocab_size:
            raise LmforgeError(
                f"{args.data_dir} was tokenized with a {data_tokenizer.vocab_size}-token vocabulary but the "
                f"model has {tokenizer.vocab_size}; prepare the data with the model's tokenizer.json"
            )
        metrics[args.split] = evaluate.evaluate_loss(
            model, dataset, tokenizer.token_byte_lengths(), batch_size=args.batch_size, max_tokens=args.max_tokens
        )
    for path in args.text or []:
        text = Path(path).read_text(encoding="utf-8")
        metrics[Path(path).stem] = evaluate.text_perplexity(model, tokenizer, text, stride=args.stride)
    progress = progress_bars()
    for path in args.task or []:
        name = Path(path).stem
        metrics[name] = evaluate.run_task(
            model, tokenizer, path, args.num_fewshot, args.limit, progress=functools.partial(progress, name)
        )
    for section, values in metrics.items():
        shown = [f"{name} {values[name]:.4f}" for name in evaluate.HEADLINE_METRICS if name in values]
        print(f"{section}: " + " | ".join(shown).replace("bits_per_byte", "bits/byte"))
    result = {"model": str(args.model), "metrics": metrics}
    if args.out:
        paths = evaluate.write_report(result, args.out)
        print(f"wrote {paths['json']}, {paths['markdown']} and {paths['html']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def progress_bars():
    """A `progress(stage, done, total)` callback for long library calls: the progress bar `fit` draws
    (`progress.ProgressBar`), one per stage, on stderr under the stage's name. Live on a terminal;
    elsewhere a line every 30 s and one at the end of each stage."""
    from lmforge.training.progress import ProgressBar

    bars = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            print(stage, file=sys.stderr, flush=True)
            bars[stage] = ProgressBar(total, sys.stderr)
        if done < total:
            bars[stage].update(done, {})
        else:
            bars[stage].finish({})

    return progress


def command_chat(args, extra) -> int:
    from lmforge.config import apply_values
    from lmforge.settings import describe_sampling, fallback_sampling

    overrides = config_values(args.config, extra)
    apply_values(fallback_sampling(chat_model=True), overrides)  # a bad key is an error before torch loads
    from lmforge.formats.loading import load, sampling_defaults
    from lmforge.inference.chat import ChatSession, chat_loop

    device = inference_device(args.device)  # a bad or missing device is an error before minutes of loading
    use_threads(args.threads)
    from lmforge.apps.vlm import is_vlm_folder

    if args.image or is_vlm_folder(args.model):
        return chat_about_image(args, overrides, device)
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model, tokenizer = load(args.model, device=device, adapter=args.adapter)
    if args.adapter:
        from lmforge.finetune.lora import describe_adapter

        print(describe_adapter(args.adapter), file=sys.stderr)
    defaults = sampling_defaults(args.model, tokenizer)
    session = ChatSession(model, tokenizer, system_prompt=args.system)
    session.sampling = apply_values(defaults.sampling, overrides)
    print(f"sampling: {describe_sampling(session.sampling)} (defaults: {defaults.source})", file=sys.stderr)
    chat_loop(session)
    return 0


def chat_about_image(args, overrides: dict, device: str) -> int:
    """`lmforge chat --image PATH` with a vision-language model folder (`finetune --task vision-chat`)."""
    from lmforge.apps.vlm import ImageChatSession, is_vlm_folder, load_vlm, open_image
    from lmforge.apps.vlm import default_sampling as vlm_default_sampling
    from lmforge.config import apply_values
    from lmforge.inference.chat import chat_loop
    from lmforge.settings import describe_sampling

    if not is_vlm_folder(args.model):
        raise LmforgeError(
            f"--image needs a vision-language model folder (from lmforge finetune --task vision-chat); "
            f"{args.model} is not one"
        )
    image = open_image(args.image) if args.image else None  # a bad image is an error before loading
    if args.adapter:
        raise LmforgeError("--adapter does not apply to a vision-language model folder (it holds its own)")
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_vlm(args.model, device=device)
    session = ImageChatSession(model.language_model, tokenizer, system_prompt=args.system)
    session.vision_model, session.image = model, image
    session.sampling = apply_values(vlm_default_sampling(), overrides)
    print(f"sampling: {describe_sampling(session.sampling)}", file=sys.stderr)
    if image is None:
        print("(no --image: the questions go without one)", file=sys.stderr)
    chat_loop(session)
    return 0


def command_quantize(args, extra) -> int:
    from lmforge.evaluation.quantization import KL_WARNING, quantize_and_save

    eval_text = Path(args.eval_text).read_text(encoding="utf-8") if args.eval_text else None
    print(f"quantising {args.model} to int{args.bits} ...", file=sys.stderr, flush=True)
    report = quantize_and_save(
        args.model, args.out, args.bits, args.group_size, eval_text, args.eval_tokens, progress=progress_bars()
    )
    layout = f"groups of {report['group_size']} columns" + ("; LM head int8" if args.bits == 4 else "")
    print(
        f"{args.out}: int{args.bits} ({layout}), "
        f"{format_bytes(report['fp32_megabytes'] * 1e6)} -> {format_bytes(report['quantized_megabytes'] * 1e6)} "
        "of weights\n"
        f"perplexity fp32 {report['perplexity_reference']:.3f} -> int{args.bits} {report['perplexity_quantized']:.3f} "
        f"| mean KL {report['mean_kl']:.5f} nats/token over {report['tokens']} tokens"
    )
    if report["warning"]:
        print(
            f"warning: mean KL {report['mean_kl']:.3f} is above {KL_WARNING}; the quantised model's answers will "
            f"differ noticeably (try --bits 8 or a smaller --group-size)",
            file=sys.stderr,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def format_bytes(size: float) -> str:
    """A size in the largest decimal unit that keeps it >= 1: '812 B', '45.3 KB', '98.2 MB', '1.4 GB'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


def main_process() -> bool:
    """False in the other processes of a torchrun job (RANK > 0): one of them reports."""
    return os.environ.get("RANK", "0") == "0"


def command_finetune(args, extra) -> int:
    from lmforge.config import apply_values
    from lmforge.settings import ClassifyConfig, SFTConfig

    values = config_values(args.config, extra)
    if args.task == "vision-chat":
        from lmforge.settings import VisionChatConfig

        config = apply_values(VisionChatConfig(), values)  # a bad key is an error before torch loads
        from lmforge.apps.vlm import train_vision_chat

        result = train_vision_chat(config)
        if not main_process():
            return 0
        encoder = result["encoder"]
        if encoder:
            print(
                f"image encoder: digit accuracy {encoder['digit_accuracy']:.3f}, "
                f"scene-cell accuracy {encoder['cell_accuracy']:.3f}"
                + (f", count accuracy {encoder['count_accuracy']:.3f}" if "count_accuracy" in encoder else "")
                + " (training images)"
            )
        print(f"wrote {result['written']} (lmforge chat {result['written']} --image PATH)")
        return 0
    config = apply_values(ClassifyConfig() if args.task == "classify" else SFTConfig(), values)
    if args.task == "classify":
        from lmforge.finetune.classify import finetune_classifier

        result = finetune_classifier(config)
        if not main_process():
            return 0
        print(
            f"validation accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f} "
            f"on {result['validation_examples']} examples; classifier, metrics.json and confusion_matrix.png "
            f"in {values.get('out', ClassifyConfig.out)}"
        )
    else:
        from lmforge.finetune.sft import finetune_chat

        result = finetune_chat(config)
        if not main_process():
            return 0
        print("wrote " + ", ".join(f"{kind} {path}" for kind, path in result["written"].items()))
    return 0


def command_explain(args, extra) -> int:
    from lmforge.evaluation.interpret import explain
    from lmforge.formats.loading import load

    if args.classifier:
        from lmforge.evaluation.interpret import explain_classification
        from lmforge.finetune.classify import TextClassifier

        classifier = TextClassifier(args.classifier, device=inference_device(args.device))
        summary = explain_classification(classifier, args.prompt, args.out)
        print(f"label: {summary['label']} ({summary['probabilities'][summary['label']]:.3f})")
        print(f"attributions: {summary['terminal'] if sys.stdout.isatty() else summary['plain']}")
        print(f"wrote {summary['files']['html']}")
        return 0
    if args.image:
        return explain_with_image(args)
    device = inference_device(args.device)  # a bad device is an error before loading
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model, tokenizer = load(args.model, device=device, keep_quantized=False)  # fp32: attributions need gradients
    summary = explain(
        model, tokenizer, args.prompt, args.out, top_k=args.top_k, method=args.method, progress=progress_bars()
    )
    print(f"next token: {summary['prediction']!r}")
    print(f"attributions ({args.method}): {summary['terminal'] if sys.stdout.isatty() else summary['plain']}")
    lens = " → ".join(repr(row["top_tokens"][0]) for row in summary["logit_lens"][-6:])
    print(f"logit lens, last layers: {lens}")
    files = summary["files"]
    print(f"wrote {files['html']}, {files['logit_lens_png']} and {len(files['attention_pngs'])} attention PNGs")
    return 0


@dataclass(frozen=True)
class ImageModel:
    """A `train-image --model` choice: the config it starts from (a torch-free dataclass, so `--help` stays
    quick) and its training function, "module:function", called as train(images, captions, config,
    out=FOLDER, resume=bool, device=DEVICE) and writing a folder whose config.json names the kind for
    `imagine`."""

    config: Callable[[], object]
    train: str


def _diffusion_config():
    from lmforge.settings import DiffusionConfig

    return DiffusionConfig()


def _gan_config():
    from lmforge.settings import GANConfig

    return GANConfig()


IMAGE_MODELS: dict[str, ImageModel] = {
    "diffusion": ImageModel(_diffusion_config, "lmforge.apps.diffusion:train_diffusion"),
    "gan": ImageModel(_gan_config, "lmforge.apps.gan:train_gan"),
}
DEFAULT_IMAGE_MODEL_FOLDER = "runs/text-to-image"
DEFAULT_DENOISING_STEPS = 50


def command_train_image(args, extra) -> int:
    import importlib

    from lmforge.config import apply_values

    choice = IMAGE_MODELS[args.model]
    config = apply_values(choice.config(), config_values(args.config, extra))
    device = inference_device(args.device)
    out = Path(args.out)
    if args.resume and not (out / "training_state.pt").is_file():
        raise LmforgeError(f"{out / 'training_state.pt'}: missing; --resume continues a run that wrote it")
    if not args.resume and (out / "training_state.pt").exists():
        raise LmforgeError(f"{out}: holds a training run; --resume it or choose another --out")
    from lmforge.apps.diffusion import load_captioned_digits, load_captioned_images

    if args.data == "digits":
        if args.captions:
            raise LmforgeError("--captions is for a folder of your own images; --data digits writes its own")
        images, captions, _ = load_captioned_digits("train", captions_per_image=args.captions_per_image)
    else:
        if not args.captions:
            raise LmforgeError(f"--data {args.data}: also give --captions FILE (JSON Lines: image, caption)")
        grayscale = getattr(config, "channels", 3) == 1
        images, captions = load_captioned_images(args.data, args.captions, config.image_size, grayscale)
    module, function = choice.train.split(":")
    print(f"training a {args.model} model on {len(images)} captioned images ...", file=sys.stderr, flush=True)
    train = getattr(importlib.import_module(module), function)
    train(images, captions, config, out=out, resume=args.resume, device=device)
    print(f'wrote {out}; try: lmforge imagine "{captions[0]}" --model {out} --out image.png')
    return 0


def command_imagine(args, extra) -> int:
    from lmforge.apps.diffusion import (
        denoising_trajectory,
        load_diffusion,
        read_image_model_kind,
        sample_images,
        save_image_grid,
        save_trajectory,
    )

    if args.n < 1:
        raise LmforgeError(f"--n must be at least 1, got {args.n}")
    if not args.prompt.strip():
        raise LmforgeError("the prompt is empty; say what to draw")
    prompts = [args.prompt] * args.n
    device = inference_device(args.device)
    if read_image_model_kind(args.model)[0] == "gan":  # one forward pass: no steps, guidance or trajectory
        from lmforge.apps.gan import load_gan, sample_gan_images

        for option, given in (
            ("--trajectory", args.trajectory),
            ("--steps", args.steps),
            ("--guidance", args.guidance),
        ):
            if given is not None:
                raise LmforgeError(f"{args.model}: a GAN draws in one step; {option} is for diffusion models")
        images = sample_gan_images(load_gan(args.model, device), prompts, args.seed)
        print(f"wrote {save_image_grid(images, args.out)}")
        return 0
    model = load_diffusion(args.model, device)
    args.steps = DEFAULT_DENOISING_STEPS if args.steps is None else args.steps
    images = sample_images(model, prompts, steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
    print(f"wrote {save_image_grid(images, args.out)}")
    if args.trajectory:
        trajectory = denoising_trajectory(model, prompts, args.steps, args.guidance, args.seed)
        written = save_trajectory(trajectory, args.trajectory)
        print(f"wrote {len(written) - 1} denoising steps and strip.png to {args.trajectory}")
    return 0


def explain_with_image(args) -> int:
    """`explain --image`: where a vision-language model looks in the image while it answers --prompt."""
    from lmforge.apps.vlm import is_vlm_folder, load_vlm, open_image
    from lmforge.evaluation.interpret import explain_image

    if not is_vlm_folder(args.model):
        raise LmforgeError(
            f"--image needs a vision-language model folder (from `lmforge finetune --task vision-chat`) as --model; "
            f"{args.model!r} is not one"
        )
    if args.max_new_tokens < 1:
        raise LmforgeError(f"--max-new-tokens is {args.max_new_tokens}; explain needs at least 1 answer token")
    image = open_image(args.image)  # a bad image (or device) is an error before loading
    device = inference_device(args.device)
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_vlm(args.model, device)
    summary = explain_image(model, tokenizer, image, args.prompt, args.out, max_new_tokens=args.max_new_tokens)
    print(f"answer: {summary['answer']!r}")
    shares = ", ".join(
        f"{token!r} {share:.0%}" for token, share in zip(summary["answer_tokens"], summary["image_attention_share"])
    )
    print(f"attention on the image, per answer token: {shares}")
    print(f"wrote {summary['files']['png']} and {Path(args.out) / 'explain.json'}")
    return 0


def command_recommend(args, extra) -> int:
    from lmforge.config import apply_values
    from lmforge.settings import RecommendConfig

    if args.action == "train":
        if args.folder:
            raise LmforgeError(f"recommend train takes no folder (got {args.folder!r}); set --out")
        config = apply_values(RecommendConfig(), config_values(args.config, extra))
        from lmforge.apps.recommend import train_recommender  # torch: once the config is known to be valid

        print(_recommend_table(train_recommender(config, device=inference_device(args.device))))
        return 0
    if extra:
        raise LmforgeError(f"unexpected arguments {extra}; config keys go with recommend train")
    if not args.folder:
        raise LmforgeError(f"recommend {args.action} needs the FOLDER `lmforge recommend train` wrote")
    from lmforge.apps import recommend

    device = inference_device(args.device)
    print(f"loading {args.folder} ...", file=sys.stderr, flush=True)
    recommender = recommend.Recommender(args.folder, device)
    if args.action == "eval":
        print(_recommend_table(recommender.evaluate()))
    elif args.action == "top":
        items = recommender.recommend(args.history.split(",") if args.history else None, args.user, args.k)
        print(json.dumps([{"item": item, "score": round(score, 4)} for item, score in items]))
    else:
        import uvicorn

        app = recommend.build_app(recommender)
        print(f"serving {args.folder} on http://{args.host}:{args.port} (POST /v1/recommend)", file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _recommend_table(result: dict) -> str:
    lines = [f"{'ranking':<10}{'model HR@10':>13}{'NDCG@10':>10}{'popularity HR@10':>19}{'NDCG@10':>10}"]
    for ranking in ("full", "sampled"):
        model, popular = result[ranking], result[f"popularity_{ranking}"]
        lines.append(
            f"{ranking:<10}{model['hr@10']:>13.4f}{model['ndcg@10']:>10.4f}"
            f"{popular['hr@10']:>19.4f}{popular['ndcg@10']:>10.4f}"
        )
    return "\n".join(lines)


def command_serve(args, extra) -> int:
    from lmforge.config import apply_values
    from lmforge.serve import ServeConfig, serve

    values = config_values(args.config, extra)
    if args.model:
        values["model"] = args.model
    serve(apply_values(ServeConfig(), values))
    return 0


def command_embed(args, extra) -> int:
    from lmforge.apps.encoder import SentenceEmbedder

    texts = list(args.texts) or [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not texts:
        raise LmforgeError("nothing to embed: give texts as arguments or one per line on stdin")
    vectors = SentenceEmbedder(args.model, device=inference_device(args.device)).embed(texts)
    print(
        json.dumps(
            [
                {"text": text, "embedding": [round(v, 6) for v in vector]}
                for text, vector in zip(texts, vectors.tolist())
            ]
        )
    )
    return 0


def command_search(args, extra) -> int:
    from lmforge.apps.encoder import SentenceEmbedder
    from lmforge.apps.search import VectorIndex, index_folder

    embedder = SentenceEmbedder(args.model, device=inference_device(args.device))
    where = Path(args.source)
    if (where / "vectors.npy").exists():
        index = VectorIndex.load(where)
    elif where.is_dir():
        print(f"indexing {where} ...", file=sys.stderr, flush=True)
        index = index_folder(where, embedder, max_chars=args.max_chars)
        if args.save:
            index.save(args.save)
            print(f"saved the index of {len(index.passages)} passages to {args.save}", file=sys.stderr)
    else:
        raise LmforgeError(f"{where}: neither a folder of text files nor a saved index (vectors.npy)")
    for query in args.queries:
        print(f"\n> {query}")
        for rank, hit in enumerate(index.search(embedder.embed([query]).numpy(), args.k)[0], 1):
            snippet = " ".join(hit.passage.text.split())[:160]
            print(f"{rank}. {hit.score:.3f}  {hit.passage.source}@{hit.passage.start}: {snippet}")
    return 0


def command_export(args, extra) -> int:
    from lmforge.formats.gguf import save_gguf
    from lmforge.formats.hf import save_hf
    from lmforge.formats.loading import load

    model, tokenizer = load(args.model)
    if args.format == "hf":
        written = save_hf(model, tokenizer, args.out)
    else:
        written = save_gguf(model, tokenizer, args.out, args.dtype)
    print(f"wrote {written}")
    return 0


def command_models(args, extra) -> int:
    from dataclasses import asdict

    from lmforge.formats.loading import available_models
    from lmforge.formats.places import hf_cache_folder, ollama_folders

    listings = available_models()
    if args.json:
        print(json.dumps([asdict(listing) | {"path": str(listing.path)} for listing in listings], indent=2))
        return 0
    header = ("NAME", "FROM", "ARCHITECTURE", "QUANTISATION", "SIZE", "NOTE")
    rows = [
        (item.name, item.place, item.architecture or "?", item.quantisation or "?", format_bytes(item.size_bytes))
        + (item.problem or "",)
        for item in listings
    ]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header) - 1)]
    for row in [header, *rows]:
        print(("  ".join(value.ljust(width) for value, width in zip(row, widths)) + "  " + row[-1]).rstrip())
    folders = " and ".join(str(folder) for folder in ollama_folders())
    print(f"\nlooked in the HF cache ({hf_cache_folder()}) and Ollama's models ({folders})", file=sys.stderr)
    return 0


def command_quickstart(args, extra) -> int:
    from lmforge.settings import train_config_from

    if args.minutes <= 0:
        raise LmforgeError(f"--minutes {args.minutes:g}: the training time must be positive")
    overrides = parse_overrides(extra)
    train_config_from(overrides)  # a mistyped key fails now, not after the data is prepared
    from lmforge.training.quickstart import quickstart

    quickstart(args.out_dir, args.minutes, overrides, overwrite=args.overwrite)
    return 0


def _sampling_defaults_help() -> str:
    import textwrap

    from lmforge.settings import describe_sampling, fallback_sampling

    return textwrap.fill(
        "A request that leaves out temperature, top_p, top_k, repetition_penalty or max_tokens gets the model's "
        "default: what its file names (a GGUF's general.sampling.*, an HF or checkpoint folder's "
        "generation_config.json), else for a chat model (one with a chat template) "
        f"{describe_sampling(fallback_sampling(chat_model=True))}, for a base model "
        f"{describe_sampling(fallback_sampling(chat_model=False))}. GET /v1/models lists them per model.",
        width=100,
    )


MODEL_HELP = (
    "a .gguf file, an HF folder, an lmforge checkpoint/run folder, a model name (smollm2-135m-instruct), an HF hub "
    "id in the HF cache (Org/Name, Org/Name:Q4_K_M) or an Ollama model (name:tag); see lmforge models"
)
ADAPTER_HELP = "a LoRA adapter folder (from lmforge finetune --task sft) to apply to the model"
DEVICE_HELP = "cpu (default), auto, cuda or cuda:N; off the CPU, quantised GGUF weights load as fp32"
APP_DEVICE_HELP = "cpu (default), auto (CUDA where there is a GPU), cuda or cuda:N"
THREADS_HELP = (
    "threads for decoding and PyTorch (default: $LMFORGE_THREADS, else chosen per decoding step from measured "
    "speed, fewer while other processes keep the cores busy)"
)
OVERWRITE_HELP = (
    "if the output folder holds a run, move that run into OUT/previous-<date>-<time>/ (nothing is deleted) "
    "and start afresh; without --overwrite a used folder is an error"
)


class Parser(argparse.ArgumentParser):
    """argparse's own errors (a bad choice, a missing required option) in the shape of every other
    error: one `error: ...` line and exit 2, instead of the usage block first."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Tokenize text files, folders or JSONL into token shards with a manifest."
    parser.add_argument("sources", nargs="*", help="text/JSONL files or folders")
    parser.add_argument("--recipe", help="a built-in corpus: shakespeare")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--tokenizer", default="char", help="char, bpe, or a tokenizer JSON path (default char)")
    parser.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size")
    parser.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of the tokens held out for validation (default 0.1)"
    )
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text (default text)")


def train_arguments(parser: argparse.ArgumentParser) -> None:
    from lmforge.settings import PRESETS, TrainConfig

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = "Pretrain (or --resume) a model."
    parser.epilog = (
        config_help(TrainConfig())
        + f"\n\nmodel.* defaults are the {TrainConfig.preset} preset's; --preset NAME starts from another "
        f"({', '.join(PRESETS)}).\nmodel.vocab-size always comes from the prepared data's tokenizer."
        "\n\nUnder torchrun (torchrun --nproc-per-node=N -m lmforge train ...), --parallel chooses how the processes"
        "\nshare the work: ddp (default) keeps a whole model on each; fsdp shards parameters, gradients and"
        "\noptimizer state across them (FSDP2); hsdp shards within groups of --hsdp-shard-processes (default:"
        "\none node's processes) and replicates across groups. fsdp/hsdp checkpoints are sharded"
        "\n(torch.distributed.checkpoint): --resume continues them on any number of processes, and export reads"
        "\nthem directly. --activation-checkpointing recomputes each block's activations in backward to save memory."
    )
    parser.add_argument("--config", help="YAML or JSON config file")
    parser.add_argument(
        "--resume", action="store_true", help="continue from out_dir's latest checkpoint (start there if it has none)"
    )
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def generate_arguments(parser: argparse.ArgumentParser) -> None:
    from lmforge.settings import SamplingConfig

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = "Stream a completion of --prompt."
    parser.epilog = config_help(SamplingConfig())
    parser.add_argument("--model", "--checkpoint", dest="model", required=True, help=MODEL_HELP)
    parser.add_argument("--prompt", help="text to continue")
    parser.add_argument("--adapter", help=ADAPTER_HELP)
    parser.add_argument(
        "--image",
        help="an image (PNG, JPEG...) to talk about; needs a vision-language model folder as the model "
        "(from lmforge finetune --task vision-chat)",
    )
    parser.add_argument("--threads", type=int, help=THREADS_HELP)
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    parser.add_argument("--config", help="YAML or JSON sampling config")
    parser.add_argument(
        "--draft",
        help="speculative decoding: a cheaper model with the same tokenizer proposes tokens, --model checks them "
        "(greedy; same text). E.g. an fp32 model with its own int4 copy",
    )
    parser.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per step")
    parser.add_argument(
        "--json-schema",
        metavar="FILE",
        help="constrain the output to JSON valid against the JSON Schema in FILE (ends when the JSON is complete)",
    )


def eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        'Task files are JSONL: {"context", "choices", "label"} lines are scored by '
        'log-likelihood (acc, acc_norm); {"context", "answer"} lines by greedy generation (exact match).\n\n'
        "  lmforge eval --model runs/quickstart --data-dir data/shakespeare\n"
        "  lmforge eval --model smollm2-135m-instruct --text notes.txt --task quiz.jsonl --num-fewshot 3 --out ev1\n"
        "  lmforge eval --compare ev1 ev2"
    )
    parser.add_argument("--model", "--checkpoint", dest="model", help=MODEL_HELP)
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    parser.add_argument("--data-dir", help="prepared dataset folder")
    parser.add_argument(
        "--split", choices=("train", "val"), default="val", help="which split of --data-dir to score (default val)"
    )
    parser.add_argument("--text", action="append", help="text file to score (repeatable); sliding window")
    parser.add_argument("--stride", type=int, default=None, help="sliding-window step (default half the context)")
    parser.add_argument("--task", action="append", help="JSONL task file (repeatable)")
    parser.add_argument("--num-fewshot", type=int, default=0, help="solved examples put before each question")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N examples of each task")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass on --data-dir")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="score at most this many tokens of --data-dir (default all)"
    )
    parser.add_argument("--out", help="folder for result.json, report.md, report.html (+ accuracy.png)")
    parser.add_argument("--json", help="also write the result to this JSON file")
    parser.add_argument("--compare", nargs="+", metavar="RESULT", help="result folders/JSONs to tabulate")


def chat_arguments(parser: argparse.ArgumentParser) -> None:
    from lmforge.formats.loading import DEFAULT_CHAT_MODEL
    from lmforge.settings import fallback_sampling

    # `lmforge chat MODEL` works too (Verb.bare_model): main() turns a bare MODEL into --model MODEL.
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = "Chat in the terminal; replies stream as they are generated."
    parser.epilog = (
        "In the chat: /reset, /system TEXT, /exit; Ctrl-C stops a reply and drops that exchange.\n\n"
        "Sampling starts from the model's own defaults where its file names them (a GGUF's general.sampling.*,\n"
        "a folder's generation_config.json), else from the values below; --key=value overrides either.\n\n"
        + config_help(fallback_sampling(chat_model=True))
    )
    parser.add_argument("--model", default=DEFAULT_CHAT_MODEL, help=MODEL_HELP + " (may be given bare: chat MODEL)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--adapter", help=ADAPTER_HELP)
    parser.add_argument(
        "--image",
        help="an image (PNG, JPEG...) to talk about; needs a vision-language model folder as the model "
        "(from lmforge finetune --task vision-chat)",
    )
    parser.add_argument("--threads", type=int, help=THREADS_HELP)
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    parser.add_argument("--config", help="YAML or JSON sampling config")


def export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write a model as an HF folder (config.json, model.safetensors, tokenizer.json, "
        "tokenizer_config.json) for transformers, or as one GGUF file for llama.cpp."
    )
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--format", choices=["hf", "gguf"], required=True, help="hf: an HF folder; gguf: a .gguf file")
    parser.add_argument("--out", required=True, help="output folder (hf) or .gguf file")
    parser.add_argument(
        "--dtype",
        choices=["f32", "f16", "q8_0", "q4_1"],
        default="f16",
        help="GGUF weight type (default f16); q8_0/q4_1 keep a quantised model's 32-wide int8/int4 blocks as they are",
    )


def finetune_arguments(parser: argparse.ArgumentParser) -> None:
    from lmforge.settings import ClassifyConfig, SFTConfig, VisionChatConfig

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "classify: a labelled CSV/TSV/JSONL/Parquet table (text, label) → a classifier folder with "
        "metrics.json (accuracy, macro-F1) and confusion_matrix.png.\n"
        'sft: chat JSONL ({"messages": [...]} a line) → LoRA adapter (out/adapter) and/or full model '
        "(out/model); loss on assistant tokens only, short chats packed into rows.\n"
        "vision-chat: a LLaVA-style model (ViT → projector → image tokens in the chat model's input) on generated\n"
        "digit and shape-scene chats → out/vlm, for `lmforge chat out/vlm --image PATH`.\n\n"
        "  lmforge finetune --task classify --data reviews.csv --model all-minilm-l6-v2 --out runs/sentiment\n"
        "  lmforge finetune --task sft --data chats.jsonl --model smollm2-135m-instruct --out runs/sft\n"
        "  lmforge finetune --task vision-chat --out runs/vision-chat"
    )
    parser.epilog = "\n\n".join(
        [
            config_help(ClassifyConfig(), "--task classify keys"),
            config_help(SFTConfig(), "--task sft keys"),
            config_help(VisionChatConfig(), "--task vision-chat keys"),
            "Under torchrun (torchrun --nproc-per-node=N -m lmforge finetune --task TASK ...), --parallel chooses how"
            "\nthe processes share the model, as for train: ddp (default) keeps a whole model on each; fsdp shards"
            "\nparameters, gradients and optimizer state across them (FSDP2); hsdp shards within groups of"
            "\n--hsdp-shard-processes and replicates across groups. Their training state is sharded"
            "\n(out/training_state/, torch.distributed.checkpoint): --resume=true continues it on any number of"
            "\nprocesses. What a run writes (a classifier, out/model, out/adapter, out/vlm) is whole either way."
            "\n--activation-checkpointing recomputes each block's activations in backward to save memory.",
        ]
    )
    parser.add_argument(
        "--task",
        choices=("classify", "sft", "vision-chat"),
        required=True,
        help="classify: a text classifier; sft: a chat model; vision-chat: a chat model that sees images",
    )
    parser.add_argument("--config", help="YAML or JSON file of the keys below")


def explain_arguments(parser: argparse.ArgumentParser) -> None:
    from lmforge.formats.loading import DEFAULT_CHAT_MODEL

    parser.description = (
        "Writes OUT/attention/attention_layer_NN.png (every head of every layer), OUT/logit_lens.png, "
        "OUT/explain.html (one self-contained page: hover a token to see where each head attends) and "
        "OUT/explain.json. With --image and a vision-language model folder as --model: its answer to --prompt, "
        "OUT/image_attention.png (the attention of each answer token over the image's patches) and OUT/explain.json."
    )
    parser.add_argument("--model", default=DEFAULT_CHAT_MODEL, help=MODEL_HELP)
    parser.add_argument(
        "--prompt", required=True, help="the text (with --classifier: the text to label; with --image: the question)"
    )
    parser.add_argument("--classifier", help="a folder from `finetune --task classify`: explain its label")
    parser.add_argument(
        "--image",
        help="an image (PNG/JPEG) for a vision-language model (--model FOLDER from finetune --task vision-chat): "
        "OUT/image_attention.png shows where its answer to --prompt looks",
    )
    parser.add_argument("--max-new-tokens", type=int, default=24, help="with --image: the longest answer explained")
    parser.add_argument("--out", default="explain", help="folder for the PNGs, HTML and JSON")
    parser.add_argument("--top-k", type=int, default=5, help="predictions per layer in the logit lens")
    parser.add_argument(
        "--method",
        choices=("integrated_gradients", "gradient_x_input"),
        default="integrated_gradients",
        help="how tokens are credited for the prediction (default integrated_gradients: 32 gradient passes)",
    )
    parser.add_argument("--device", default="cpu", help=APP_DEVICE_HELP)


def train_image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Train a text-to-image model: on scikit-learn's digits with generated captions (default), or on a "
        "folder of your own images with a captions file (JSON Lines, one image a line: "
        '{"image": "cat.png", "caption": "a black cat"}, paths relative to the folder). '
        "Writes OUT/config.json + OUT/model.safetensors, and OUT/training_state.pt for --resume.\n\n"
        "  lmforge train-image --out runs/text-to-image --epochs 30\n"
        "  lmforge train-image --data photos/ --captions captions.jsonl --channels 3 --image-size 16 --out runs/mine"
    )
    parser.epilog = "\n\n".join(
        config_help(model.config(), f"--model {name} keys") for name, model in IMAGE_MODELS.items()
    )
    parser.add_argument("--model", choices=sorted(IMAGE_MODELS), default="diffusion", help="which kind of model")
    parser.add_argument("--data", default="digits", help="'digits' (default) or a folder of images")
    parser.add_argument("--captions", help="JSON Lines captions file for the images in --data")
    parser.add_argument(
        "--captions-per-image", type=int, default=1, help="digits: copies of each image, each with its own phrasing"
    )
    parser.add_argument("--out", default=DEFAULT_IMAGE_MODEL_FOLDER, help="folder for the model and training state")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its training state")
    parser.add_argument("--config", help="YAML or JSON file of the keys below")
    parser.add_argument("--device", default="cpu", help=APP_DEVICE_HELP)


def imagine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Draw images for a text prompt with a model from `lmforge train-image`; writes a PNG grid."
    parser.add_argument("prompt", help='what to draw, e.g. "a handwritten seven"')
    parser.add_argument("--model", default=DEFAULT_IMAGE_MODEL_FOLDER, help="folder written by lmforge train-image")
    parser.add_argument("--out", default="imagine.png", help="PNG file for the grid (default imagine.png)")
    parser.add_argument("--n", type=int, default=16, help="how many images (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed draws the same images")
    parser.add_argument(
        "--steps", type=int, help=f"diffusion: DDIM denoising steps (default {DEFAULT_DENOISING_STEPS})"
    )
    parser.add_argument(
        "--guidance",
        type=float,
        help="diffusion: classifier-free guidance scale (default: the model's; 0 ignores the prompt)",
    )
    parser.add_argument("--trajectory", help="also write the denoising steps as PNGs (and strip.png) to this folder")
    parser.add_argument("--device", default="cpu", help=APP_DEVICE_HELP)


def recommend_arguments(parser: argparse.ArgumentParser) -> None:
    from lmforge.settings import RecommendConfig

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "train: fit a recommender on an interaction log (CSV user,item,timestamp; MovieLens "
        "ratings.csv / ratings.dat / u.data; or 'synthetic'), leave-one-out HR@10/NDCG@10 vs popularity.\n"
        "eval: re-score a saved recommender. top: top-k items for --user or --history a,b,c. "
        'serve: POST /v1/recommend {"history": [...]} or {"user": ...}.\n\n'
        "  lmforge recommend train --data ratings.csv --model sasrec --out runs/rec\n"
        "  lmforge recommend eval runs/rec\n"
        "  lmforge recommend top runs/rec --history 1,2,3 -k 5\n"
        "  lmforge recommend serve runs/rec --port 8010"
    )
    parser.epilog = config_help(RecommendConfig(), "train keys")
    parser.add_argument("action", choices=("train", "eval", "top", "serve"), help="what to do (above)")
    parser.add_argument("folder", nargs="?", help="a saved recommender (eval, top, serve)")
    parser.add_argument("--config", help="YAML or JSON training config (train)")
    parser.add_argument("--user", help="a user id from the training log (top)")
    parser.add_argument("--history", help="comma-separated item ids, oldest first (top)")
    parser.add_argument("-k", type=int, default=10, help="how many items to recommend (top; default 10)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (serve; default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8010, help="port to listen on (serve; default 8010)")
    parser.add_argument("--device", default="cpu", help=APP_DEVICE_HELP)


def serve_arguments(parser: argparse.ArgumentParser) -> None:
    from lmforge.serve import ServeConfig

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Serve a model over HTTP: /v1/chat/completions, /v1/completions, /v1/embeddings, "
        "/v1/models, /health, /metrics, and a chat page at /. Requests are batched continuously.\n\n"
        + _sampling_defaults_help()
    )
    parser.epilog = config_help(ServeConfig())
    parser.add_argument("--model", help=MODEL_HELP + " (default smollm2-135m-instruct; may be given bare: serve MODEL)")
    parser.add_argument("--config", help="YAML or JSON server config")


def embed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Embed texts (arguments, or one per line on stdin): mean pooling + L2 norm, like sentence-transformers."
    )
    parser.add_argument("texts", nargs="*", help="texts to embed (default: one per line on stdin)")
    parser.add_argument("--model", default="all-minilm-l6-v2", help="built-in name or HF BERT folder")
    parser.add_argument("--device", default="cpu", help=APP_DEVICE_HELP)


def search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Index the .txt/.md/.rst files of a folder by passage (or load a saved index) and print "
        "the passages nearest to each query (cosine similarity, exact)."
    )
    parser.add_argument("source", help="folder of text files, or a folder saved with --save")
    parser.add_argument("queries", nargs="+", help="what to look for")
    parser.add_argument("-k", type=int, default=5, help="results per query")
    parser.add_argument("--save", help="also save the built index to this folder")
    parser.add_argument("--max-chars", type=int, default=800, help="passage length when indexing")
    parser.add_argument("--device", default="cpu", help=APP_DEVICE_HELP)
    parser.add_argument("--model", default="all-minilm-l6-v2", help="built-in name or HF BERT folder")


def quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Quantise every Linear layer (and the LM head) of a model and save a checkpoint folder "
        "that loads directly. Prints perplexity and mean KL divergence vs the fp32 model on held-out text."
    )
    parser.add_argument("model", help="model name, .gguf file, HF folder or lmforge checkpoint")
    parser.add_argument("--out", required=True, help="folder to write the quantised checkpoint to")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4, help="bits per weight (default 4)")
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="columns per scale (multiple of 32; default 32 for int4, a whole row for int8)",
    )
    parser.add_argument("--eval-text", help="text file for the quality report (default: held-out Shakespeare)")
    parser.add_argument("--eval-tokens", type=int, default=2048, help="tokens of it to score")
    parser.add_argument("--json", help="also write the report here")


def models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "List the models --model can name without a path: the built-in ones, HF hub repositories in the local "
        "HF cache ($HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub) and models Ollama pulled "
        "($OLLAMA_MODELS or ~/.ollama/models). Read from file headers; nothing is downloaded."
    )
    parser.add_argument("--json", action="store_true", help="print the list as JSON")


def quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Tokenize the built-in Shakespeare by character, train the quickstart preset for about "
        "--minutes (the step count is calibrated from a few timed steps), then print samples, the validation "
        "loss and where the checkpoint and loss curve are."
    )
    parser.epilog = "Any train config key may follow as --key=value (see lmforge train --help)."
    parser.add_argument("--minutes", type=float, default=3.0, help="training time budget (default 3)")
    parser.add_argument("--out-dir", default="runs/quickstart", help="run folder (default runs/quickstart)")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP + " (OUT/data is kept)")


@dataclass(frozen=True)
class Verb:
    """One `lmforge VERB`: the function it runs, the function that declares its options and help page
    (imports stay torch-free: `--help` and argument errors come back at once), its line in `lmforge --help`."""

    run: Callable[[argparse.Namespace, list[str]], int]
    add_arguments: Callable[[argparse.ArgumentParser], None]
    help: str
    # Unknown `--key value` arguments are config overrides; on the other verbs they are mistakes,
    # reported before the verb imports torch or loads a model.
    takes_overrides: bool = False
    bare_model: bool = False  # an optional bare MODEL among the overrides: `lmforge serve MODEL`


# litgpt's __main__ maps verb -> function the same way; the order is `lmforge --help`'s.
VERBS: dict[str, Verb] = {
    "prepare": Verb(command_prepare, prepare_arguments, "tokenize text/JSONL into train/val shards"),
    "train": Verb(command_train, train_arguments, "pretrain a model on prepared data", takes_overrides=True),
    "generate": Verb(command_generate, generate_arguments, "sample text from a model", takes_overrides=True),
    "eval": Verb(
        command_eval,
        eval_arguments,
        "perplexity / bits-per-byte and multiple-choice or generative tasks; reports; comparisons",
    ),
    "chat": Verb(
        command_chat,
        chat_arguments,
        "interactive chat with a model (default: SmolLM2-135M-Instruct)",
        takes_overrides=True,
        bare_model=True,
    ),
    "export": Verb(command_export, export_arguments, "write a model as an HF folder or a GGUF file"),
    "finetune": Verb(
        command_finetune,
        finetune_arguments,
        "fine-tune: a text classifier (--task classify), a chat model on conversations (--task sft) or on images "
        "(--task vision-chat)",
        takes_overrides=True,
    ),
    "explain": Verb(
        command_explain,
        explain_arguments,
        "attention maps, logit lens and token attributions for a prompt's next token",
    ),
    "train-image": Verb(
        command_train_image,
        train_image_arguments,
        "train a text-to-image model (diffusion, or the GAN baseline) on captioned digits or your own captioned images",
        takes_overrides=True,
    ),
    "imagine": Verb(command_imagine, imagine_arguments, "draw images for a text prompt (PNG grid)"),
    "recommend": Verb(
        command_recommend,
        recommend_arguments,
        "sequential recommendation (SASRec, matrix factorisation): train, eval, top, serve",
        takes_overrides=True,
    ),
    "serve": Verb(
        command_serve,
        serve_arguments,
        "OpenAI-compatible API server with a web chat page (default: SmolLM2-135M-Instruct)",
        takes_overrides=True,
        bare_model=True,
    ),
    "embed": Verb(command_embed, embed_arguments, "sentence embeddings (default all-MiniLM-L6-v2) as JSON"),
    "search": Verb(command_search, search_arguments, "semantic search over a folder of text files"),
    "quantize": Verb(
        command_quantize, quantize_arguments, "int8/int4 weight-only quantisation with a perplexity/KL quality report"
    ),
    "models": Verb(command_models, models_arguments, "list the models found locally (built-in, HF cache, Ollama)"),
    "quickstart": Verb(
        command_quickstart,
        quickstart_arguments,
        "train a small GPT on Shakespeare in minutes and sample from it",
        takes_overrides=True,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lmforge", description="Train, fine-tune, evaluate and serve GPT-style models.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", help="what to do; lmforge VERB --help for its options")
    for name, verb in VERBS.items():
        verb.add_arguments(verbs.add_parser(name, help=verb.help))
    return parser


def model_argument_as_option(argv: list[str]) -> list[str]:
    """For verbs taking an optional bare MODEL among free `--key value` overrides (chat, serve):
    turn MODEL into `--model MODEL`, since argparse would take an override's value for it
    (`lmforge serve --port 8001 model.gguf`)."""
    if not argv or argv[0] not in VERBS or not VERBS[argv[0]].bare_model:
        return argv
    rest, index = argv[1:], 0
    while index < len(rest):
        token = rest[index]
        if token.startswith("-"):
            takes_value = token.startswith("--") and "=" not in token and token != "--help"
            index += 2 if takes_value and index + 1 < len(rest) and not rest[index + 1].startswith("--") else 1
            continue
        return [argv[0], *rest[:index], "--model", token, *rest[index + 1 :]]
    return argv


# What a user can cause with a path they give (an --out folder taken by a file, a missing input),
# for every verb at once.
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def path_error_advice(error: OSError) -> str:
    if isinstance(error, FileNotFoundError):
        return "no such file or folder"
    if isinstance(error, PermissionError):
        return "permission denied; choose another path or fix its permissions"
    if isinstance(error, IsADirectoryError):
        return "is a folder, not a file; choose a file path"
    if isinstance(error, NotADirectoryError) or Path(error.filename).is_file():
        return "a file is in the way (a folder is needed here); choose another path or remove the file"
    return "already exists; choose another path or remove it"


def options_with_dashes(argv: list[str]) -> list[str]:
    """`--max_batch 8` → `--max-batch 8`, `--model.n_layers=2` → `--model.n-layers=2`: options are
    defined and shown with dashes, and the config-file spelling with underscores works too."""
    converted = []
    for index, token in enumerate(argv):
        if token == "--":  # what follows is positional text
            return converted + argv[index:]
        if token.startswith("--"):
            name, equals, value = token.partition("=")
            token = dashed(name) + equals + value
        converted.append(token)
    return converted


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = options_with_dashes(model_argument_as_option(list(sys.argv[1:] if argv is None else argv)))
    args, extra = parser.parse_known_args(argv)
    if args.verb is None:
        parser.print_help()
        return 0
    try:
        verb = VERBS[args.verb]
        if extra and not verb.takes_overrides:
            raise LmforgeError(f"unexpected arguments {extra}; see lmforge {args.verb} --help")
        return verb.run(args, extra)
    except LmforgeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except PATH_ERRORS as error:
        if error.filename is None:
            raise
        print(f"error: {error.filename}: {path_error_advice(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
