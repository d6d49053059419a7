"""Supervised fine-tuning on chat conversations: the model's chat template, loss on assistant tokens only, packing.

Data is JSONL, one conversation a line, in OpenAI's format:
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}

`finetune_chat` is `lmforge finetune --task sft`: LoRA adapters by default (`lora_rank=0`
trains every weight), trained with `fit`, saved as an adapter folder and/or a full model. Under
torchrun, `parallel=fsdp/hsdp` shards the model (`fit.compile`); what is written stays one whole folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lmforge.atomic import remove
from lmforge.errors import LmforgeError
from lmforge.inference.chat import ROLES, chat_pieces
from lmforge.model import Transformer
from lmforge.settings import SFTConfig
from lmforge.tokenizer import Tokenizer
from lmforge.training import distributed
from lmforge.training.data import read_records
from lmforge.training.fit import Callback, EarlyStopping, Fittable, WarmupCosine
from lmforge.training.parallelize import gather_full_weights, weightless_copy, writes_sharded_checkpoints
from lmforge.training.pretrain import resolve_device
from lmforge.training.run_folder import (
    SHARDED_TRAINING_STATE,
    TRAINING_STATE,
    claim_fine_tune_folder,
    fine_tune_checkpointing,
    settings_to_record,
)

IGNORE = -100  # target id that the loss skips (PyTorch's cross_entropy ignore_index)
# What finetune_chat writes into `out`.
RUN_FILES = ("adapter", "model", "metrics.json", TRAINING_STATE, SHARDED_TRAINING_STATE)


def read_conversations(path: str | Path) -> list[list[dict]]:
    """Every `messages` list of a chat JSONL file, checked: roles, string contents, at least one assistant turn."""
    conversations = []
    for line_number, record in read_records(path):
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise LmforgeError(f"{path}:{line_number}: needs a non-empty 'messages' list")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise LmforgeError(f"{path}:{line_number}: message {index} needs a role in {ROLES}")
            if not isinstance(message.get("content"), str):
                raise LmforgeError(f"{path}:{line_number}: message {index} needs string 'content'")
        if not any(message["role"] == "assistant" for message in messages):
            raise LmforgeError(f"{path}:{line_number}: no assistant message to learn from")
        conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    if not conversations:
        raise LmforgeError(f"{path}: no conversations")
    return conversations


def tokenize_conversation(
    tokenizer: Tokenizer, messages: list[dict], encode_pieces: Callable[[list], list[int]] | None = None
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether an assistant turn wrote it.

    Each assistant turn is found by rendering the conversation up to it twice: with the
    generation prompt (what the model sees before answering) and with the turn itself; the
    difference (its text and end-of-turn marker) is what the model must learn to produce.
    `encode_pieces` turns (text, is_markup) pieces into ids (default `tokenizer.encode_marked`; a
    vision-language model's also places its image tokens).
    """
    encode_pieces = encode_pieces or tokenizer.encode_marked

    ids: list[int] = []
    is_assistant: list[bool] = []
    rendered = ""

    def add(pieces: list[tuple[str, bool]], start: int, assistant: bool) -> None:
        """Encode `pieces` from character `start` on (markup keeps its special tokens, contents stay text)."""
        tail, offset = [], 0
        for text, is_markup in pieces:
            if offset + len(text) > start:
                tail.append((text[max(0, start - offset) :], is_markup))
            offset += len(text)
        encoded = encode_pieces(tail)
        ids.extend(encoded)
        is_assistant.extend([assistant] * len(encoded))

    def text_of(pieces: list[tuple[str, bool]]) -> str:
        return "".join(text for text, _ in pieces)

    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_pieces = chat_pieces(tokenizer, messages[:index], True)
        through_pieces = chat_pieces(tokenizer, messages[: index + 1], False)
        prompt, through = text_of(prompt_pieces), text_of(through_pieces)
        if not (prompt.startswith(rendered) and through.startswith(prompt)):
            raise LmforgeError("the chat template does not render conversations as growing prefixes; cannot mask")
        add(prompt_pieces, len(rendered), False)
        add(through_pieces, len(prompt), True)
        rendered = through
    whole_pieces = chat_pieces(tokenizer, messages, False)
    if text_of(whole_pieces).startswith(rendered):
        add(whole_pieces, len(rendered), False)
    return ids, is_assistant


def training_pair(ids: list[int], is_assistant: list[bool]) -> tuple[list[int], list[int]]:
    """(inputs, targets) for next-token training: a target is the next id if an assistant wrote it, else IGNORE."""
    return ids[:-1], [token if scored else IGNORE for token, scored in zip(ids[1:], is_assistant[1:])]


def pack(
    pairs: list[tuple[list[int], list[int]]], length: int, pad_id: int, packing: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Rows of `length` tokens: (inputs, targets, document ids, number of examples cut short).

    Packing fills each row with whole examples one after another (no padding wasted on short
    chats). Document ids (1, 2, ... within a row; 0 for padding) keep the examples apart: the
    model attends only within a document and restarts positions at each, so a packed example
    trains exactly as it would alone. An example longer than `length` is cut to fit.
    """
    rows: list[tuple[list[int], list[int], list[int]]] = []
    truncated = 0
    for inputs, targets in pairs:
        if len(inputs) > length:
            inputs, targets, truncated = inputs[:length], targets[:length], truncated + 1
        if packing and rows and len(rows[-1][0]) + len(inputs) <= length:
            row = rows[-1]
            document = row[2][-1] + 1
            row[0].extend(inputs)
            row[1].extend(targets)
            row[2].extend([document] * len(inputs))
        else:
            rows.append((list(inputs), list(targets), [1] * len(inputs)))
    width = length if packing else max(len(inputs) for inputs, _, _ in rows)
    input_tensor = torch.full((len(rows), width), pad_id, dtype=torch.long)
    target_tensor = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    document_tensor = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (inputs, targets, documents) in enumerate(rows):
        input_tensor[i, : len(inputs)] = torch.tensor(inputs)
        target_tensor[i, : len(targets)] = torch.tensor(targets)
        document_tensor[i, : len(documents)] = torch.tensor(documents)
    return input_tensor, target_tensor, document_tensor, truncated


class NextTokenModel(Fittable, nn.Module):
    """A language model seen by `fit`: packed tokens and their document ids in, logits out
    (the loss is `token_crossentropy`)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, document_ids=document_ids)[0]


def conversations_to_rows(
    tokenizer: Tokenizer, conversations: list[list[dict]], length: int, packing: bool, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, dict]:
    """((inputs, document ids), targets, counts) for `fit`, examples in a seeded random order."""
    pairs = [training_pair(*tokenize_conversation(tokenizer, messages)) for messages in conversations]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    inputs, targets, documents, truncated = pack([pairs[i] for i in order], length, tokenizer.padding_id, packing)
    scored = int((targets != IGNORE).sum())
    stats = {"conversations": len(pairs), "rows": len(inputs), "scored_tokens": scored, "truncated": truncated}
    stats["tokens"] = sum(len(p[0]) for p in pairs)
    return (inputs, documents), targets, stats


class SaveAdapterEachEpoch(Callback):
    """Write the LoRA adapter (atomically) at the end of every epoch. `whole`: for a sharded model, the
    `weightless_copy` its weights are gathered into first (every process takes part; the main one writes)."""

    def __init__(self, folder: Path, base_model: str, whole: NextTokenModel | None = None):
        self.folder, self.base_model, self.whole = folder, base_model, whole

    def on_epoch_end(self, epoch, logs):
        from lmforge.finetune.lora import save_adapter

        is_main = self.params.get("is_main", True)
        if self.whole is not None:
            gather_full_weights(self.model, self.whole, is_main)
        if is_main:  # under torchrun one process writes
            trained = self.model if self.whole is None else self.whole
            save_adapter(trained.model, self.folder, base_model=self.base_model)


def finetune_chat(config: SFTConfig, verbose: int = 1) -> dict:
    """Fine-tune on chat JSONL; writes out/adapter (LoRA) and/or out/model (full or merged) and out/metrics.json."""
    from lmforge.finetune.lora import LoraConfig, apply_lora, count_trainable, remove_lora, save_adapter
    from lmforge.formats.checkpoint import save_model
    from lmforge.formats.loading import load

    if not config.data:
        raise LmforgeError('SFT needs data: a JSONL file of {"messages": [...]} conversations')
    out = Path(config.out)
    device = resolve_device(config.device)
    processes = distributed.init_process_group(device.type)  # under torchrun: one process moves and writes files
    if processes.is_main:
        claim_fine_tune_folder(out, RUN_FILES, config, "run", verbose)
    torch.manual_seed(config.seed)
    model, tokenizer = load(config.model, device=str(device), keep_quantized=False)
    length = min(config.max_tokens, model.config.block_size)
    x, y, stats = conversations_to_rows(tokenizer, read_conversations(config.data), length, config.packing, config.seed)
    validation = None
    if config.validation:
        vx, vy, _ = conversations_to_rows(
            tokenizer, read_conversations(config.validation), length, config.packing, config.seed
        )
        validation = (vx, vy)
    if config.lora_rank:
        lora = LoraConfig(config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets)
        apply_lora(model, lora)
    trainer = NextTokenModel(model)
    # Sharded over processes, the trained weights are gathered into a weightless copy taken now, before
    # compile shards the trainer, and written from it: one whole folder, as from one process.
    sharded = processes.is_distributed and writes_sharded_checkpoints(config)
    whole = weightless_copy(trainer) if sharded else trainer
    if verbose:
        print(
            f"{stats['conversations']} conversations → {stats['rows']} rows of ≤{length} tokens, "
            f"{stats['scored_tokens']:,} assistant tokens scored"
            + (f", {stats['truncated']} cut short" if stats["truncated"] else "")
            + f"; {count_trainable(model):,} of {sum(p.numel() for p in model.parameters()):,} parameters train"
            + (f"; {config.parallel} over {processes.world_size} processes" if sharded else "")
        )
    trainer.compile(
        "adamw",
        "token_crossentropy",
        ["accuracy"],
        from_logits=True,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        clip_grad_norm=config.clip_grad_norm,
        parallelism=config.parallelism(),
    )
    schedule = WarmupCosine(config.warmup_steps)
    callbacks = [schedule]
    if config.lora_rank:  # the adapter is megabytes: keep the latest epoch's, so a crash loses at most one
        callbacks.append(SaveAdapterEachEpoch(out / "adapter", config.model, whole if sharded else None))
    if validation is not None:
        callbacks.append(EarlyStopping("val_loss", patience=1, restore_best_weights=True))
    history = trainer.fit(
        x,
        y,
        epochs=config.epochs,
        batch_size=config.batch_size,
        validation_data=validation,
        callbacks=callbacks,
        accumulation_steps=config.accumulation_steps,
        verbose=verbose,
        seed=config.seed,
        **fine_tune_checkpointing(out, config, writes_sharded_checkpoints(config)),
    )
    if sharded:
        gather_full_weights(trainer, whole, processes.is_main)
        model = whole.model
    written = {}
    if processes.is_main:  # every process holds the same trained weights: one writes them
        out.mkdir(parents=True, exist_ok=True)
        if config.lora_rank:
            written["adapter"] = str(save_adapter(model, out / "adapter", base_model=config.model))
        if not config.lora_rank or config.merge:
            merged = remove_lora(model) if config.lora_rank else model
            written["model"] = str(save_model(out / "model", merged, tokenizer, {"base_model": config.model}))
    result = {
        **stats,
        "history": history.history,
        "written": written,
        "warmup_steps": schedule.warmup_steps,
        "reached_peak_learning_rate": schedule.reached_peak,
    }
    if processes.is_main:
        (out / "metrics.json").write_text(json.dumps({**result, "config": settings_to_record(config)}, indent=2) + "\n")
        for state in (TRAINING_STATE, SHARDED_TRAINING_STATE):  # the run is complete: nothing left to resume
            remove(out / state)
    distributed.shutdown(processes)
    return result
