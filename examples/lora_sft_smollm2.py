"""LoRA-SFT SmolLM2-135M-Instruct to answer every question as one line of JSON: {"answer": "<one sentence>"}.

Out of the box the model answers in chatty prose. We fine-tune rank-8 LoRA adapters on ~110
generated question/answer chats (capitals, sums, opposites, plurals, colours, animal sounds),
then ask held-out questions of other kinds it never saw in training, before and after, and
measure how many replies are valid JSON with an "answer" key (and, for held-out capitals,
whether the answer is right). Runs offline on 2 CPU cores in a few minutes:

    python examples/lora_sft_smollm2.py [--out runs/json-answers]
    lmforge chat --adapter runs/json-answers/adapter      # then talk to the result
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from lmforge.finetune.sft import SFTConfig, finetune_chat
from lmforge.formats.loading import load
from lmforge.inference.chat import encode_chat, stop_token_ids
from lmforge.inference.generate import SamplingConfig, generate

BASE = "smollm2-135m-instruct"
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow", "Egypt": "Cairo",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasília", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Kenya": "Nairobi", "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin", "Turkey": "Ankara",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Chile": "Santiago", "Cuba": "Havana", "Denmark": "Copenhagen",
    "Hungary": "Budapest", "Belgium": "Brussels", "Netherlands": "Amsterdam", "Australia": "Canberra",
    "South Korea": "Seoul", "Iran": "Tehran", "Iraq": "Baghdad", "Nigeria": "Abuja", "Colombia": "Bogotá",
}  # fmt: skip
HELD_OUT_COUNTRIES = ["Japan", "Egypt", "Canada", "Greece", "Norway", "Austria", "Thailand", "Chile"]
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "up": "down",
    "old": "young", "open": "closed", "early": "late", "full": "empty", "hard": "soft", "rich": "poor",
}  # fmt: skip
PLURALS = {"mouse": "mice", "child": "children", "goose": "geese", "foot": "feet", "tooth": "teeth",
           "man": "men", "woman": "women", "person": "people", "cactus": "cacti", "leaf": "leaves"}  # fmt: skip
COLOURS = {"the sky on a clear day": "blue", "grass": "green", "snow": "white", "a ripe banana": "yellow",
           "coal": "black", "a ripe tomato": "red", "an orange": "orange", "a flamingo": "pink"}  # fmt: skip
SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "owl": "hoot",
          "lion": "roar", "snake": "hiss"}  # fmt: skip
# Other kinds of question than any in training: does the format carry over?
HELD_OUT_QUESTIONS = [
    "Who wrote Romeo and Juliet?", "How many legs does a spider have?",
    "What is the largest planet in our solar system?", "What gas do plants take in from the air?",
    "How many days are in a week?", "What is the boiling point of water in Celsius?",
    "Which ocean is the largest?", "What language is spoken in Brazil?", "How many continents are there?",
    "What do bees make?", "What is the freezing point of water in Fahrenheit?", "Who painted the Mona Lisa?",
]  # fmt: skip


def reply(answer: str) -> str:
    return json.dumps({"answer": answer}, ensure_ascii=False)


def training_chats(seed: int = 0) -> list[dict]:
    """Questions with one-sentence answers wrapped in JSON. A whole sentence, not a bare word: a
    135M model finds "The capital of Japan is" → "Tokyo" far more reliably than "Tokyo" cold."""
    rng = random.Random(seed)
    pairs = []
    capital_forms = ["What is the capital of {}?", "What's the capital city of {}?", "Capital of {}?"]
    for country, capital in CAPITALS.items():
        if country not in HELD_OUT_COUNTRIES:
            pairs.append((rng.choice(capital_forms).format(country), f"The capital of {country} is {capital}."))
    for _ in range(40):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        form = rng.choice(["What is {} plus {}?", "What is {} + {}?", "Add {} and {}."])
        pairs.append((form.format(a, b), f"{a} plus {b} is {a + b}."))
    for word, opposite in OPPOSITES.items():
        form = rng.choice(["What is the opposite of {}?", "Give the antonym of '{}'."])
        pairs.append((form.format(word), f"The opposite of {word} is {opposite}."))
    for word, plural in PLURALS.items():
        form = rng.choice(["What is the plural of {}?", "Plural of '{}'?"])
        pairs.append((form.format(word), f"The plural of {word} is {plural}."))
    for thing, colour in COLOURS.items():
        pairs.append((f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}."))
    for animal, sound in SOUNDS.items():
        form = rng.choice(["What sound does a {} make?", "What does a {} say?"])
        pairs.append((form.format(animal), f"A {animal} says {sound}."))
    rng.shuffle(pairs)
    chats = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": reply(a)}]} for q, a in pairs
    ]
    return chats


def parses_as_answer(text: str) -> bool:
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and set(value) == {"answer"} and isinstance(value["answer"], str)


def ask(model, tokenizer, questions: list[str]) -> list[str]:
    sampling = SamplingConfig(max_new_tokens=48, temperature=0.0)
    stops = stop_token_ids(tokenizer)
    replies = []
    for question in questions:
        prompt = encode_chat(tokenizer, [{"role": "user", "content": question}])
        replies.append("".join(generate(model, tokenizer, prompt, sampling, stop_token_ids=stops)).strip())
    return replies


def score(replies_by_question: dict[str, str]) -> dict:
    capital_questions = [f"What is the capital of {country}?" for country in HELD_OUT_COUNTRIES]
    json_ok = [parses_as_answer(text) for text in replies_by_question.values()]
    capitals_right = [
        CAPITALS[country].lower() in replies_by_question[question].lower()
        for country, question in zip(HELD_OUT_COUNTRIES, capital_questions)
    ]
    return {"json_rate": sum(json_ok) / len(json_ok), "capital_accuracy": sum(capitals_right) / len(capitals_right)}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/json-answers")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--json", default="benchmarks/results/lora_sft_smollm2.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chats = training_chats()
    (out / "train.jsonl").write_text("".join(json.dumps(chat, ensure_ascii=False) + "\n" for chat in chats))
    questions = [f"What is the capital of {country}?" for country in HELD_OUT_COUNTRIES] + HELD_OUT_QUESTIONS

    model, tokenizer = load(BASE, keep_quantized=False)
    before = dict(zip(questions, ask(model, tokenizer, questions)))
    started = time.perf_counter()
    config = SFTConfig(
        data=str(out / "train.jsonl"), model=BASE, out=str(out), epochs=args.epochs, batch_size=4,
        learning_rate=args.learning_rate, max_tokens=256, lora_rank=8, lora_alpha=16,
        warmup_steps=5,  # the README's results were measured with it (the default is now a tenth of the run)
        overwrite=True,  # a rerun replaces the last one's adapter (moved into out/previous-<date>-<time>/)
    )  # fmt: skip
    training = finetune_chat(config)
    seconds = time.perf_counter() - started
    model, tokenizer = load(BASE, keep_quantized=False, adapter=out / "adapter")
    after = dict(zip(questions, ask(model, tokenizer, questions)))

    result = {
        "base": BASE,
        "training_chats": len(chats),
        "training_seconds": round(seconds, 1),
        "scored_tokens": training["scored_tokens"],
        "final_loss": training["history"]["loss"][-1],
        "before": score(before),
        "after": score(after),
        "held_out_questions": len(questions),
        "examples": [{"question": q, "before": before[q], "after": after[q]} for q in questions],
    }
    print(f"\nfine-tuned on {len(chats)} chats in {seconds:.0f} s; {len(questions)} held-out questions")
    print(f"{'':<22}{'before':>10}{'after':>10}")
    for key in ("json_rate", "capital_accuracy"):
        print(f"{key:<22}{result['before'][key]:>10.2f}{result['after'][key]:>10.2f}")
    for example in result["examples"][:3] + result["examples"][-3:]:
        print(
            f"\nQ: {example['question']}\n  before: {example['before'][:100]!r}\n  after:  {example['after'][:100]!r}"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


if __name__ == "__main__":
    main()
