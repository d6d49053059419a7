import json

import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.tokenizer import load_tokenizer
from lmforge.training.data import TokenDataset, load_manifest, prepare


def decode_split(data_dir, split):
    dataset = TokenDataset(data_dir, split)
    tokens = np.concatenate([np.asarray(s) for s in dataset.shards])
    return dataset.tokenizer().decode(tokens.tolist())


def test_prepare_round_trips_the_corpus(char_dataset, corpus_file):
    manifest = load_manifest(char_dataset)
    assert manifest["dtype"] == "uint16"
    text = (decode_split(char_dataset, "train") + decode_split(char_dataset, "val")).replace("<|endoftext|>", "")
    assert text == corpus_file.read_text()
    train, val = manifest["splits"]["train"]["tokens"], manifest["splits"]["val"]["tokens"]
    assert 0.05 < val / (train + val) < 0.15  # the last ~10% of bytes, cut at line boundaries
    assert manifest["sources"][0]["sha256"] and manifest["sources"][0]["bytes"] == corpus_file.stat().st_size


def test_streaming_chunks_and_shards_give_the_same_tokens(tmp_path, corpus_file, char_dataset):
    # Tiny shards force many files; the tokens must be the same stream.
    prepare([corpus_file], tmp_path, tokenizer=str(char_dataset / "tokenizer.json"), shard_tokens=1000)
    manifest = load_manifest(tmp_path)
    assert len(manifest["splits"]["train"]["shards"]) > 5
    assert decode_split(tmp_path, "train") == decode_split(char_dataset, "train")


def test_folders_and_jsonl_with_custom_field(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("hello world\n" * 50)
    (folder / "sub" / "b.jsonl").write_text("\n".join(json.dumps({"body": f"record {i}"}) for i in range(40)))
    (folder / "ignored.bin").write_bytes(b"\xff\xfe")
    manifest = prepare([folder], tmp_path / "out", tokenizer="bpe", vocab_size=300, text_field="body")
    assert [s["path"].split("/")[-1] for s in manifest["sources"]] == ["a.txt", "b.jsonl"]
    text = decode_split(tmp_path / "out", "train") + decode_split(tmp_path / "out", "val")
    assert "record 39" in text and "hello world" in text


def test_uint32_for_large_vocabularies(tmp_path, corpus_file):
    tokenizer = load_tokenizer_with_vocab(70000)
    manifest = prepare([corpus_file], tmp_path, tokenizer=tokenizer)
    assert manifest["dtype"] == "uint32"


def load_tokenizer_with_vocab(size):
    from lmforge.tokenizer import CharTokenizer

    return CharTokenizer([chr(0x20000 + i) for i in range(size)] + list("abcdefghijklmnopqrstuvwxyz .\n!"))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.txt", b"good line\nbad \xff byte\n", r"bad.txt:2: not valid UTF-8 \(byte 0xff at column 5\)"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', r"bad.jsonl:2: invalid JSON"),
        ("field.jsonl", b'{"text": "ok"}\n{"content": "x"}\n', r"field.jsonl:2: record has no field 'text'"),
        ("type.jsonl", b'{"text": 5}\n', r"type.jsonl:1: field 'text' is int, expected a string"),
        ("empty.txt", b"", r"empty corpus"),
    ],
)
def test_malformed_input_names_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(LmforgeError, match=message):
        prepare([path], tmp_path / "out", tokenizer="char", val_fraction=0.0)


def test_missing_source_and_tiny_corpus_errors(tmp_path):
    with pytest.raises(LmforgeError, match="no such file"):
        prepare([tmp_path / "nope.txt"], tmp_path / "out")
    small = tmp_path / "one.txt"
    small.write_text("one single line without a second\n")
    with pytest.raises(LmforgeError, match="validation split is empty"):
        prepare([small], tmp_path / "out", tokenizer="char")


def test_random_windows_are_reproducible_and_shifted(char_dataset):
    dataset = TokenDataset(char_dataset, "train")
    first = dataset.gather(dataset.sample_starts(8, 16, torch.Generator().manual_seed(5)), 16)
    second = dataset.gather(dataset.sample_starts(8, 16, torch.Generator().manual_seed(5)), 16)
    assert torch.equal(first[0], second[0])
    inputs, targets = first
    assert inputs.shape == (8, 16) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_generator_state_resumes_the_sample_stream(char_dataset):
    dataset = TokenDataset(char_dataset, "train")
    generator = torch.Generator().manual_seed(1)
    dataset.sample_starts(4, 16, generator)
    state = generator.get_state()
    expected = dataset.sample_starts(4, 16, generator)
    resumed = torch.Generator()
    resumed.set_state(state)
    assert dataset.sample_starts(4, 16, resumed) == expected


def test_sequential_iteration_covers_split_in_order(char_dataset):
    dataset = TokenDataset(char_dataset, "val")
    batches = list(dataset.iterate(block_size=16, batch_size=4))
    inputs = torch.cat([b[0] for b in batches]).flatten()
    full = torch.from_numpy(np.concatenate([np.asarray(s) for s in dataset.shards]).astype(np.int64))
    assert torch.equal(inputs, full[: len(inputs)])
    assert len(inputs) > len(full) - 2 * 16


def test_dataset_errors(tmp_path, char_dataset):
    with pytest.raises(LmforgeError, match="run `lmforge prepare`"):
        TokenDataset(tmp_path)
    with pytest.raises(LmforgeError, match="no split 'test'"):
        TokenDataset(char_dataset, "test")
    with pytest.raises(LmforgeError, match="too few"):
        TokenDataset(char_dataset, "val").sample_starts(1, 10**7, torch.Generator())
    assert load_tokenizer(char_dataset / "tokenizer.json").kind == "char"


def test_labelled_tables_read_alike_from_csv_jsonl_and_parquet(tmp_path):
    import pyarrow
    import pyarrow.parquet

    from lmforge.training.data import read_labelled_texts

    rows = [{"review": "great, fun", "stars": "pos"}, {"review": 'said "meh"', "stars": "neg"}]
    rows.append({"review": "ünïcode ok", "stars": "pos"})
    (tmp_path / "t.csv").write_text('review,stars\n"great, fun",pos\n"said ""meh""",neg\nünïcode ok,pos\n')
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "t.parquet")
    results = [read_labelled_texts(tmp_path / f"t.{kind}", "review", "stars") for kind in ("csv", "jsonl", "parquet")]
    for result in results:
        assert result.texts == [row["review"] for row in rows]
        assert result.label_names == ["neg", "pos"] and result.labels == [1, 0, 1]
    integers = tmp_path / "n.jsonl"
    integers.write_text('{"text": "a", "label": 10}\n{"text": "b", "label": 2}\n')
    assert read_labelled_texts(integers).label_names == ["2", "10"]  # numeric labels sort as numbers


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.csv", "text,label\nfine,1\n,0\n", r"a.csv:3: missing field 'text'"),
        ("b.csv", "text,label\nfine,1,extra\n", r"b.csv:2: more fields than the header"),
        ("c.jsonl", '{"text": "x", "label": 1}\n{"text": "y"\n', r"c.jsonl:2: invalid JSON"),
        ("d.jsonl", '{"text": 5, "label": 1}\n', r"d.jsonl:1: field 'text' is int"),
        ("e.txt", "x", r"expected one of .csv"),
        ("f.csv", "text,label\n", r"f.csv: no records"),
    ],
)
def test_bad_labelled_tables_name_file_line_and_field(tmp_path, name, content, message):
    from lmforge.training.data import read_labelled_texts

    (tmp_path / name).write_text(content)
    with pytest.raises(LmforgeError, match=message):
        read_labelled_texts(tmp_path / name)


def test_validation_labels_must_be_known_to_training(tmp_path):
    from lmforge.training.data import read_labelled_texts

    (tmp_path / "v.csv").write_text("text,label\na,pos\nb,maybe\n")
    with pytest.raises(LmforgeError, match=r"labels \['maybe'\] are not among the known classes"):
        read_labelled_texts(tmp_path / "v.csv", label_names=["neg", "pos"])
