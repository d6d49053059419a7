"""Models found where other tools keep them: fake HF hub caches (snapshots of symlinks into blobs, refs)
and Ollama stores (manifests + blobs) in tmp_path, holding tiny real models; no network, ever."""

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.formats import places
from lmforge.formats.gguf import save_gguf
from lmforge.formats.gguf_file import GGUFFile
from lmforge.formats.hf import save_hf
from lmforge.formats.loading import available_models, load, model_location, sampling_defaults

from .test_loading import tiny_llama

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Finding and loading is offline: any connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(autouse=True)
def empty_places(tmp_path, monkeypatch):
    """Every test starts with its own empty HF cache and Ollama store, never the machine's."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny llama saved as an HF folder and as F32 and Q8_0 GGUF files."""
    model, tokenizer = tiny_llama()
    out = tmp_path_factory.mktemp("exported")
    return {
        "hf": save_hf(model, tokenizer, out / "hf"),
        "F32": save_gguf(model, tokenizer, out / "tiny-F32.gguf", "f32"),
        "Q8_0": save_gguf(model, tokenizer, out / "tiny.Q8_0.gguf", "q8_0"),
    }


def logits(name_or_path):
    model, tokenizer = load(name_or_path)
    with torch.no_grad():
        return model(torch.tensor([tokenizer.encode("hello there, world.")]))[0]


def add_to_hf_cache(cache, repo, files, commit=COMMIT_A, ref="main"):
    """models--Org--Name as huggingface_hub lays it out: blobs by content hash, snapshots/<commit>/
    of relative symlinks into them, refs/<ref> naming the commit. `files`: {name in the repo: source file}."""
    repo_folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_folder / "snapshots" / commit
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo_folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo_folder / "refs").mkdir(exist_ok=True)
        (repo_folder / "refs" / ref).write_text(commit)
    return snapshot


def hf_folder_files(folder):
    return {path.name: path for path in folder.iterdir()}


def add_to_ollama(store, manifest_path, gguf, extra_layers=(), layer=None):
    """An Ollama manifest (manifests/<registry>/<namespace>/<name>/<tag>) whose model layer is `gguf`'s blob."""
    data = gguf.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    (store / "blobs" / f"sha256-{digest}").write_bytes(data)
    model_layer = {"mediaType": places.MODEL_LAYER, "digest": f"sha256:{digest}", "size": len(data)}
    manifest = {
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "0" * 64},
        "layers": [layer or model_layer, *extra_layers],
    }
    path = store / "manifests" / manifest_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return path


def test_hf_repo_id_in_the_cache_loads_like_its_folder(tmp_path, exported):
    snapshot = add_to_hf_cache(tmp_path / "hf-cache", "Org/Tiny", hf_folder_files(exported["hf"]))
    assert (snapshot / "config.json").is_symlink()
    assert model_location("Org/Tiny") == (snapshot, "hf")
    assert torch.equal(logits("Org/Tiny"), logits(exported["hf"]))


def test_gguf_repo_takes_a_quant_suffix(tmp_path, exported):
    files = {"tiny-F32.gguf": exported["F32"], "q8/tiny.Q8_0.gguf": exported["Q8_0"]}
    files["mmproj-tiny-F16.gguf"] = exported["F32"]  # a vision projector: never a choice
    snapshot = add_to_hf_cache(tmp_path / "hf-cache", "Org/Tiny-GGUF", files)
    assert model_location("Org/Tiny-GGUF:Q8_0") == (snapshot / "q8" / "tiny.Q8_0.gguf", "gguf")
    assert model_location("Org/Tiny-GGUF:f32") == (snapshot / "tiny-F32.gguf", "gguf")  # any case
    assert torch.equal(logits("Org/Tiny-GGUF:Q8_0"), logits(exported["Q8_0"]))
    with pytest.raises(LmforgeError, match="2 GGUF files; name one: Org/Tiny-GGUF:Q8_0, Org/Tiny-GGUF:F32"):
        model_location("Org/Tiny-GGUF")
    with pytest.raises(
        LmforgeError,
        match=r"no GGUF file for :Q4_K_M \(its GGUF files: Q8_0 \(q8/tiny.Q8_0.gguf\), F32 \(tiny-F32.gguf\)\)",
    ):
        model_location("Org/Tiny-GGUF:Q4_K_M")


def test_a_single_gguf_needs_no_suffix_and_the_folder_wins_over_ggufs(tmp_path, exported):
    cache = tmp_path / "hf-cache"
    single = add_to_hf_cache(cache, "Org/One", {"one-Q8_0.gguf": exported["Q8_0"]})
    assert model_location("Org/One") == (single / "one-Q8_0.gguf", "gguf")
    both = add_to_hf_cache(cache, "Org/Both", {**hf_folder_files(exported["hf"]), "both-F32.gguf": exported["F32"]})
    assert model_location("Org/Both") == (both, "hf")
    assert model_location("Org/Both:F32") == (both / "both-F32.gguf", "gguf")


def test_revisions_pick_their_snapshot(tmp_path, exported):
    cache = tmp_path / "hf-cache"
    main = add_to_hf_cache(cache, "Org/Tiny", {"tiny-F32.gguf": exported["F32"]}, COMMIT_A, "main")
    dev = add_to_hf_cache(cache, "Org/Tiny", {"tiny-Q8_0.gguf": exported["Q8_0"]}, COMMIT_B, "dev")
    os.utime(dev, (1e9, 1e9))  # older than main's snapshot: refs/main decides, not age
    assert model_location("Org/Tiny")[0].parent == main
    assert model_location("Org/Tiny@dev")[0].parent == dev
    assert model_location(f"Org/Tiny@{COMMIT_B}")[0].parent == dev
    assert model_location(f"Org/Tiny@{COMMIT_B}:Q8_0")[0] == dev / "tiny-Q8_0.gguf"
    assert torch.equal(logits("Org/Tiny@dev"), logits(exported["Q8_0"]))
    with pytest.raises(LmforgeError, match=r"no revision 'v2' in the cache \(refs: dev, main\)"):
        model_location("Org/Tiny@v2")
    with pytest.raises(LmforgeError, match=f"revision '{'c' * 40}' is not downloaded"):
        model_location(f"Org/Tiny@{'c' * 40}")
    (cache / "models--Org--Tiny" / "refs" / "main").unlink()  # no refs/main: the newest snapshot
    assert model_location("Org/Tiny")[0].parent == main


def test_cache_folder_follows_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert places.hf_cache_folder() == tmp_path / "home" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert places.hf_cache_folder() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert places.hf_cache_folder() == tmp_path / "user" / ".cache" / "huggingface" / "hub"
    monkeypatch.delenv("OLLAMA_MODELS")
    assert places.ollama_folders() == [tmp_path / "user" / ".ollama" / "models", places.OLLAMA_SERVICE_MODELS]


def test_incomplete_downloads_are_clear_errors(tmp_path, exported):
    snapshot = add_to_hf_cache(tmp_path / "hf-cache", "Org/Tiny", hf_folder_files(exported["hf"]))
    next(snapshot.glob("*.safetensors")).resolve().unlink()
    with pytest.raises(LmforgeError, match=r"the download did not finish .* `hf download Org/Tiny`"):
        model_location("Org/Tiny")
    config_only = add_to_hf_cache(tmp_path / "hf-cache", "Org/Config", {"config.json": exported["hf"] / "config.json"})
    with pytest.raises(LmforgeError, match=f"{config_only}: no weights lmforge reads .*holds config.json"):
        model_location("Org/Config")


def test_ollama_names_load_the_model_blob(tmp_path, exported):
    store = tmp_path / "ollama"
    projector = {"mediaType": "application/vnd.ollama.image.projector", "digest": "sha256:" + "1" * 64, "size": 1}
    add_to_ollama(store, "registry.ollama.ai/library/tiny/q8", exported["Q8_0"], [projector])
    add_to_ollama(store, "registry.ollama.ai/library/tiny/latest", exported["F32"])
    add_to_ollama(store, "registry.ollama.ai/someone/tiny/latest", exported["F32"])
    add_to_ollama(store, "hf.co/Org/Tiny-GGUF/Q8_0", exported["Q8_0"])
    blob = store / "blobs" / f"sha256-{hashlib.sha256(exported['Q8_0'].read_bytes()).hexdigest()}"
    assert model_location("tiny:q8") == (blob, "gguf")
    assert model_location("library/tiny:q8") == (blob, "gguf")
    assert model_location("hf.co/Org/Tiny-GGUF:Q8_0") == (blob, "gguf")
    assert model_location("tiny")[0] == model_location("someone/tiny")[0] != blob
    assert torch.equal(logits("tiny:q8"), logits(exported["Q8_0"]))
    tokenizer = load(exported["Q8_0"])[1]
    assert sampling_defaults("tiny:q8", tokenizer) == sampling_defaults(exported["Q8_0"], tokenizer)


def test_resolution_order_path_then_builtin_then_hf_cache_then_ollama(tmp_path, exported, monkeypatch):
    store = tmp_path / "ollama"
    add_to_ollama(store, "registry.ollama.ai/library/smollm2-135m-instruct/latest", exported["F32"])
    assert model_location("smollm2-135m-instruct")[0].name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    add_to_ollama(store, "registry.ollama.ai/Org/Tiny/latest", exported["F32"])
    hf = add_to_hf_cache(tmp_path / "hf-cache", "Org/Tiny", {"tiny-Q8_0.gguf": exported["Q8_0"]})
    assert model_location("Org/Tiny") == (hf / "tiny-Q8_0.gguf", "gguf")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(exported["hf"], tmp_path / "Org" / "Tiny")
    assert model_location("Org/Tiny") == (Path("Org/Tiny"), "hf")


def test_not_found_names_every_folder_searched_and_how_to_get_it(tmp_path):
    with pytest.raises(LmforgeError) as caught:
        model_location("Org/Missing:Q4_K_M")
    message = str(caught.value)
    assert str(tmp_path / "hf-cache" / "models--Org--Missing") in message
    assert str(tmp_path / "ollama" / "manifests" / "registry.ollama.ai" / "Org" / "Missing" / "Q4_K_M") in message
    assert 'lmforge never downloads: run `hf download Org/Missing --include "*Q4_K_M*.gguf"`' in message
    with pytest.raises(LmforgeError) as caught:
        model_location("qwen3:0.6b")
    message = str(caught.value)
    assert "HF cache" not in message and "`ollama pull qwen3:0.6b`" in message
    assert str(tmp_path / "ollama" / "manifests" / "registry.ollama.ai" / "library" / "qwen3" / "0.6b") in message


@pytest.mark.parametrize(
    "layer, error",
    [
        ({"mediaType": places.MODEL_LAYER, "digest": "sha256:../../../etc/passwd"}, "is not sha256:<64 hex digits>"),
        ({"mediaType": places.MODEL_LAYER, "digest": "md5:" + "0" * 32}, "is not sha256:<64 hex digits>"),
        ({"mediaType": places.MODEL_LAYER, "digest": ["sha256:" + "0" * 64]}, "is not sha256:<64 hex digits>"),
        ({"mediaType": places.MODEL_LAYER, "digest": "sha256:" + "e" * 64}, "the model's blob is missing"),
        ({"mediaType": "application/vnd.ollama.image.license", "digest": "x"}, "0 layers of mediaType"),
    ],
)
def test_hostile_manifests_are_clear_errors(tmp_path, exported, layer, error):
    add_to_ollama(tmp_path / "ollama", "registry.ollama.ai/library/bad/latest", exported["F32"], layer=layer)
    with pytest.raises(LmforgeError, match=error):
        model_location("bad")


def test_damaged_manifests_and_refs_are_clear_errors(tmp_path, exported):
    store = tmp_path / "ollama"
    manifest = add_to_ollama(store, "registry.ollama.ai/library/bad/latest", exported["F32"])
    values = json.loads(manifest.read_text())
    values["layers"][0]["size"] += 1
    manifest.write_text(json.dumps(values))
    with pytest.raises(LmforgeError, match="bytes, but .* says"):
        model_location("bad")
    manifest.write_text("{not json")
    with pytest.raises(LmforgeError, match="not valid JSON"):
        model_location("bad")
    manifest.write_text('{"layers": "everything"}')
    with pytest.raises(LmforgeError, match="not an Ollama manifest"):
        model_location("bad")
    refs = add_to_hf_cache(tmp_path / "hf-cache", "Org/Tiny", {"t.gguf": exported["F32"]}).parents[1] / "refs"
    (refs / "main").write_text("../../../../etc")
    with pytest.raises(LmforgeError, match="refs/main: not a commit hash"):
        model_location("Org/Tiny")


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/../../b", "..:latest", "x/y/z/w", "Org/Na--me", "tiny:../x"])
def test_names_that_would_leave_the_stores_are_not_looked_up(tmp_path, name):
    (tmp_path / "hf-cache").mkdir()
    assert places.find_placed_model(name) is None
    assert all("/../" not in where for where in places.where_looked(name))


def test_unsupported_things_are_listed_and_marked(tmp_path, exported):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_tensor("x", torch.zeros(4, 32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    add_to_ollama(tmp_path / "ollama", "registry.ollama.ai/library/snake/latest", tmp_path / "mamba.gguf")
    add_to_ollama(tmp_path / "ollama", "registry.ollama.ai/library/gone/latest", exported["F32"])
    (tmp_path / "ollama" / "blobs" / f"sha256-{hashlib.sha256(exported['F32'].read_bytes()).hexdigest()}").unlink()
    bert = tmp_path / "bert"
    shutil.copytree(exported["hf"], bert)
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "torch_dtype": "float32"}))
    add_to_hf_cache(tmp_path / "hf-cache", "Org/Bert", hf_folder_files(bert))
    listed = {item.name: item for item in available_models()}
    assert listed["snake:latest"].architecture == "mamba" and listed["snake:latest"].quantisation == "Q4_K_M"
    assert listed["snake:latest"].problem == "architecture 'mamba' is not supported"
    assert listed["Org/Bert"].problem == "architecture 'bert' is not supported"
    assert "the model's blob is missing" in listed["gone:latest"].problem


def test_models_lists_every_place_with_architecture_quantisation_and_size(tmp_path, exported):
    cache = tmp_path / "hf-cache"
    add_to_hf_cache(cache, "Org/Tiny", hf_folder_files(exported["hf"]))
    add_to_hf_cache(cache, "Org/Tiny-GGUF", {"tiny-F32.gguf": exported["F32"], "tiny-Q8_0.gguf": exported["Q8_0"]})
    add_to_hf_cache(cache, "Org/Tokenizer-only", {"tokenizer.json": exported["hf"] / "tokenizer.json"})
    add_to_ollama(tmp_path / "ollama", "registry.ollama.ai/library/tiny/q8", exported["Q8_0"])
    manifest = add_to_ollama(tmp_path / "ollama", "registry.ollama.ai/library/broken/latest", exported["F32"])
    manifest.write_text('{"layers": []}')
    listed = {item.name: item for item in available_models()}
    assert sorted(listed) == [
        "Org/Tiny",
        "Org/Tiny-GGUF:F32",
        "Org/Tiny-GGUF:Q8_0",
        "broken:latest",
        "smollm2-135m-instruct",
        "tiny:q8",
    ]
    hf_size = sum(path.stat().st_size for path in exported["hf"].iterdir())
    assert (listed["Org/Tiny"].architecture, listed["Org/Tiny"].quantisation) == ("llama", "f32")
    assert listed["Org/Tiny"].size_bytes == hf_size and listed["Org/Tiny"].place == "HF cache"
    for name, quantisation in [("Org/Tiny-GGUF:F32", "F32"), ("Org/Tiny-GGUF:Q8_0", "Q8_0"), ("tiny:q8", "Q8_0")]:
        item = listed[name]
        assert (item.architecture, item.quantisation, item.problem) == ("llama", quantisation, None)
        assert item.size_bytes == exported[quantisation].stat().st_size
        assert model_location(name)[0] == item.path  # each listed name loads what is listed
    assert listed["tiny:q8"].place == "Ollama"
    assert "0 layers of mediaType" in listed["broken:latest"].problem
    assert listed["smollm2-135m-instruct"].quantisation == "Q4_1"


def test_the_listing_reads_gguf_headers_only_up_to_what_it_shows(exported):
    fields = GGUFFile(exported["F32"], stop_after={"general.architecture", "general.file_type"}).fields
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == 0
    assert "tokenizer.ggml.tokens" not in fields  # the vocabulary, most of a header, is not parsed


def test_a_gguf_without_a_file_type_is_named_by_its_commonest_tensor_type(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "old.gguf"), "llama")
    writer.add_tensor("big", torch.zeros(8, 64, dtype=torch.float16).numpy())
    writer.add_tensor("small", torch.zeros(2, 32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert places.gguf_summary(tmp_path / "old.gguf") == ("llama", "F16")


def test_split_ggufs_are_refused_with_how_to_join_them(tmp_path, exported):
    parts = {f"big-Q8_0-0000{part}-of-00002.gguf": exported["Q8_0"] for part in (1, 2)}
    add_to_hf_cache(tmp_path / "hf-cache", "Org/Big", parts)
    for name in ("Org/Big", "Org/Big:q8_0"):
        with pytest.raises(
            LmforgeError, match="one of 2 parts of a split GGUF.*llama-gguf-split --merge big-Q8_0-00001"
        ):
            model_location(name)
    (listed,) = [item for item in available_models() if item.place == "HF cache"]
    assert listed.name == "Org/Big" and "split GGUF" in listed.problem
