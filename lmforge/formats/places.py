"""Where people keep the models other tools downloaded, found offline (lmforge never downloads):
the Hugging Face hub cache (`hf download`, transformers) and Ollama's store (`ollama pull`).

HF cache: <cache>/models--Org--Name/refs/<branch> holds a commit hash, snapshots/<commit>/ the repository's
files as symlinks into ../../blobs. Ollama: manifests/<registry>/<namespace>/<name>/<tag> is a JSON manifest
whose layer of mediaType application/vnd.ollama.image.model names blobs/sha256-<hex>, a GGUF file.
Both are untrusted input: names, refs and digests are checked before they become paths.
Torch-free: `lmforge models` lists these places in well under a second.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.formats.gguf_file import GGUF_ARCHITECTURES
from lmforge.formats.metadata import HF_MODEL_TYPES, read_json_object


@dataclass
class PlacedModel:
    """A model found in the HF cache or Ollama's store: the name that finds it, its files and their format."""

    name: str
    path: Path  # an HF folder (a snapshot) or a GGUF file
    format: str  # "hf" or "gguf"
    place: str  # "HF cache" or "Ollama"


def find_placed_model(name: str) -> PlacedModel | None:
    """The model `name` names in the HF cache (an `Org/Name[@revision][:QUANT]` id), else in Ollama's store
    (`[[registry/]namespace/]name[:tag]`); None where neither holds it. A model that is there but cannot be
    used as it is (several GGUF files and no :QUANT, an unfinished download, a damaged manifest) is an error."""
    hf_id = parse_hf_id(name)
    if hf_id is not None:
        found = find_in_hf_cache(hf_id)
        if found is not None:
            return found
    ollama_name = parse_ollama_name(name)
    return find_in_ollama(ollama_name) if ollama_name is not None else None


def where_looked(name: str) -> list[str]:
    """The exact places `find_placed_model(name)` looked in, for the message when it finds nothing."""
    looked = []
    hf_id = parse_hf_id(name)
    if hf_id is not None:
        looked.append(f"the HF cache ({hf_cache_folder() / hf_id.folder_name})")
    ollama_name = parse_ollama_name(name)
    if ollama_name is not None:
        manifests = " or ".join(str(folder / ollama_name.manifest) for folder in ollama_folders())
        looked.append(f"Ollama's models ({manifests})")
    return looked


def how_to_get(name: str) -> str:
    """How to put `name` where lmforge looks: the command to run on a machine with internet access."""
    hf_id, ollama_name = parse_hf_id(name), parse_ollama_name(name)
    if hf_id is not None:
        files = f' --include "*{hf_id.quant}*.gguf"' if hf_id.quant else ""
        command = f"hf download {hf_id.repo}{files}" + (f" --revision {hf_id.revision}" if hf_id.revision else "")
    elif ollama_name is not None:
        command = f"ollama pull {name}"
    else:
        return ""
    return f". lmforge never downloads: run `{command}` where there is internet access (and copy the cache here)"


# ---------------------------------------------------------------------------------------------------- HF cache


def hf_cache_folder() -> Path:
    """huggingface_hub's cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ${XDG_CACHE_HOME:-~/.cache}/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "huggingface" / "hub"


# The hub's rule for repo ids (letters, digits, - _ . ; no "--" or ".."), a revision (a branch, tag or
# commit), and a quantisation tag naming one of the repository's GGUF files, as llama.cpp's -hf and Ollama take it.
HF_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.-]+))?(?::(?P<quant>[\w.-]+))?", re.ASCII
)
COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HFId:
    repo: str  # Org/Name
    revision: str | None
    quant: str | None  # Q4_K_M

    @property
    def folder_name(self) -> str:
        return "models--" + self.repo.replace("/", "--")


def parse_hf_id(name: str) -> HFId | None:
    match = HF_ID.fullmatch(name)
    if match is None or "--" in match["repo"] or ".." in match["repo"] or ".." in (match["revision"] or ""):
        return None
    return HFId(match["repo"], match["revision"], match["quant"])


def find_in_hf_cache(hf_id: HFId) -> PlacedModel | None:
    repo_folder = hf_cache_folder() / hf_id.folder_name
    if not repo_folder.is_dir():
        return None
    snapshot = snapshot_folder(repo_folder, hf_id)
    name = hf_id.repo + (f"@{hf_id.revision}" if hf_id.revision else "")
    ggufs = gguf_choices(snapshot)
    if hf_id.quant is not None:
        if hf_id.quant.upper() not in ggufs:
            have = ", ".join(f"{tag} ({files[0].relative_to(snapshot)})" for tag, files in ggufs.items()) or "none"
            raise LmforgeError(f"{snapshot}: no GGUF file for :{hf_id.quant} (its GGUF files: {have})")
        return PlacedModel(f"{name}:{hf_id.quant}", one_gguf(ggufs[hf_id.quant.upper()], hf_id), "gguf", "HF cache")
    weights = sorted(snapshot.glob("*.safetensors"))
    if (snapshot / "config.json").exists() and weights:
        for path in weights:
            present(path, hf_id)
        return PlacedModel(name, snapshot, "hf", "HF cache")
    if len(ggufs) == 1:
        return PlacedModel(name, one_gguf(next(iter(ggufs.values())), hf_id), "gguf", "HF cache")
    if ggufs:
        raise LmforgeError(
            f"{snapshot}: {len(ggufs)} GGUF files; name one: {', '.join(f'{name}:{tag}' for tag in ggufs)}"
        )
    files = ", ".join(sorted(path.name for path in snapshot.iterdir())) or "nothing"
    raise LmforgeError(
        f"{snapshot}: no weights lmforge reads (config.json with .safetensors, or a .gguf file); "
        f"the cache holds {files}. Download them with `hf download {hf_id.repo}`"
    )


def snapshot_folder(repo_folder: Path, hf_id: HFId) -> Path:
    """The snapshot a revision names (a commit, or a branch/tag through refs/), by default the one refs/main
    names, else the newest."""
    snapshots = repo_folder / "snapshots"
    revision = hf_id.revision
    if revision is None and not (repo_folder / "refs" / "main").is_file():
        downloaded = [path for path in snapshots.iterdir() if path.is_dir()] if snapshots.is_dir() else []
        if not downloaded:
            raise LmforgeError(
                f"{repo_folder}: no snapshot downloaded; run `hf download {hf_id.repo}` on a "
                "machine with internet access"
            )
        return max(downloaded, key=lambda path: path.stat().st_mtime)
    revision = revision or "main"
    commit = revision
    if not COMMIT.fullmatch(revision):
        ref = repo_folder / "refs" / revision
        if not ref.is_file():
            known = sorted(path.name for path in (repo_folder / "refs").glob("*")) or ["none"]
            raise LmforgeError(f"{repo_folder}: no revision {revision!r} in the cache (refs: {', '.join(known)})")
        commit = ref.read_text(encoding="utf-8", errors="replace").strip()
        if not COMMIT.fullmatch(commit):
            raise LmforgeError(f"{ref}: not a commit hash ({commit[:60]!r})")
    folder = snapshots / commit
    if not folder.is_dir():
        raise LmforgeError(
            f"{folder}: revision {revision!r} is not downloaded; run `hf download {hf_id.repo} "
            f"--revision {revision}` on a machine with internet access"
        )
    return folder


# llama.cpp's gguf-split names the parts of a model too large for one file NAME-00001-of-00003.gguf.
SPLIT_PART = re.compile(r"-\d{5}-of-\d{5}$")


def gguf_choices(snapshot: Path) -> dict[str, list[Path]]:
    """A snapshot's GGUF models by quantisation tag (the parts of a split model together); multimodal
    projectors (mmproj-*.gguf) are left out: vision is not read."""
    choices = {}
    for path in sorted(snapshot.rglob("*.gguf")):
        if not path.name.lower().startswith("mmproj"):
            choices.setdefault(quant_tag(path), []).append(path)
    return choices


def quant_tag(path: Path) -> str:
    """The quantisation a GGUF file's name ends with: Qwen2.5-0.5B-Instruct-Q4_K_M.gguf -> Q4_K_M."""
    return re.split(r"[-.]", SPLIT_PART.sub("", path.stem))[-1].upper()


def one_gguf(files: list[Path], hf_id: HFId) -> Path:
    """The file of a quantisation tag: one, and whole."""
    if any(SPLIT_PART.search(path.stem) for path in files):
        raise LmforgeError(
            f"{files[0]}: one of {len(files)} parts of a split GGUF, and lmforge reads single files; join them "
            f"with llama.cpp's `llama-gguf-split --merge {files[0].name} merged.gguf` and pass merged.gguf"
        )
    if len(files) > 1:
        raise LmforgeError(f"{hf_id.repo}: several GGUF files have that quantisation: {', '.join(map(str, files))}")
    return present(files[0], hf_id)


def present(path: Path, hf_id: HFId) -> Path:
    """`path` where its symlink reaches a blob; a dangling one is a download that did not finish."""
    if not path.exists():
        raise LmforgeError(
            f"{path}: the download did not finish (its blob is missing); run `hf download "
            f"{hf_id.repo}` again on a machine with internet access"
        )
    return path


# ---------------------------------------------------------------------------------------------------- Ollama

OLLAMA_REGISTRY, OLLAMA_NAMESPACE, OLLAMA_TAG = "registry.ollama.ai", "library", "latest"
# Where Linux's install script has the ollama service keep what `ollama pull` fetches (its user's home).
OLLAMA_SERVICE_MODELS = Path("/usr/share/ollama/.ollama/models")
# Ollama's rules for a registry host (with a port), a namespace or name, and a tag: none can be "." or "..".
OLLAMA_HOST = re.compile(r"[A-Za-z0-9][\w.-]*(?::[0-9]+)?", re.ASCII)
OLLAMA_PART = re.compile(r"[A-Za-z0-9][\w.-]{0,79}", re.ASCII)
OLLAMA_TAG_RULE = re.compile(r"\w[\w.-]{0,79}", re.ASCII)
MODEL_LAYER = "application/vnd.ollama.image.model"
DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


def ollama_folders() -> list[Path]:
    """$OLLAMA_MODELS, else ~/.ollama/models and the Linux service's folder."""
    if os.environ.get("OLLAMA_MODELS"):
        return [Path(os.environ["OLLAMA_MODELS"]).expanduser()]
    return [Path.home() / ".ollama" / "models", OLLAMA_SERVICE_MODELS]


@dataclass(frozen=True)
class OllamaName:
    registry: str
    namespace: str
    model: str
    tag: str

    @property
    def manifest(self) -> Path:
        return Path("manifests", self.registry, self.namespace, self.model, self.tag)

    def __str__(self) -> str:
        """The name as `ollama list` shows it: the default registry and namespace left out."""
        name = f"{self.model}:{self.tag}"
        if self.registry == OLLAMA_REGISTRY:
            return name if self.namespace == OLLAMA_NAMESPACE else f"{self.namespace}/{name}"
        return f"{self.registry}/{self.namespace}/{name}"


def parse_ollama_name(name: str) -> OllamaName | None:
    path, colon, tag = name.rpartition(":")
    if not colon or "/" in tag:  # the colon of a registry's port, or none: no tag
        path, tag = name, OLLAMA_TAG
    parts = path.split("/")
    if not 1 <= len(parts) <= 3 or not OLLAMA_TAG_RULE.fullmatch(tag):
        return None
    registry, namespace, model = [OLLAMA_REGISTRY, OLLAMA_NAMESPACE][: 3 - len(parts)] + parts
    if not (OLLAMA_HOST.fullmatch(registry) and OLLAMA_PART.fullmatch(namespace) and OLLAMA_PART.fullmatch(model)):
        return None
    return OllamaName(registry, namespace, model, tag)


def find_in_ollama(name: OllamaName) -> PlacedModel | None:
    for folder in ollama_folders():
        manifest = folder / name.manifest
        if manifest.is_file():
            return PlacedModel(str(name), model_blob(folder, manifest), "gguf", "Ollama")
    return None


def model_blob(folder: Path, manifest: Path) -> Path:
    """The GGUF blob a manifest's model layer names, every field checked: the file may be damaged or hostile."""
    values = read_json_object(manifest)
    layers = values.get("layers")
    if not isinstance(layers, list) or not all(isinstance(layer, dict) for layer in layers):
        raise LmforgeError(f"{manifest}: not an Ollama manifest (no list of layers)")
    models = [layer for layer in layers if layer.get("mediaType") == MODEL_LAYER]
    if len(models) != 1:
        raise LmforgeError(f"{manifest}: {len(models)} layers of mediaType {MODEL_LAYER} (expected one)")
    digest, size = models[0].get("digest"), models[0].get("size")
    match = DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        raise LmforgeError(f"{manifest}: the model layer's digest {digest!r} is not sha256:<64 hex digits>")
    blob = folder / "blobs" / f"sha256-{match[1]}"
    if not blob.is_file():
        raise LmforgeError(f"{blob}: the model's blob is missing; run `ollama pull` for it again")
    if isinstance(size, int) and not isinstance(size, bool) and blob.stat().st_size != size:
        raise LmforgeError(
            f"{blob}: {blob.stat().st_size} bytes, but {manifest} says {size}; run `ollama pull` for it again"
        )
    return blob


# ---------------------------------------------------------------------------------------------------- listing


@dataclass
class ModelListing:
    """One row of `lmforge models`."""

    name: str  # what --model takes
    place: str  # "built-in", "HF cache" or "Ollama"
    path: Path
    architecture: str | None = None
    quantisation: str | None = None
    size_bytes: int = 0
    problem: str | None = None  # why it would not load: an unsupported architecture, an unreadable file


def list_placed_models() -> list[ModelListing]:
    """Every model the HF cache and Ollama's store hold, by the names that find them; one that could not
    be used as it is (a missing blob, a damaged manifest) is listed with its problem."""
    listings = []
    cache = hf_cache_folder()
    for repo_folder in sorted(cache.glob("models--*--*")) if cache.is_dir() else []:
        hf_id = parse_hf_id(repo_folder.name.removeprefix("models--").replace("--", "/"))
        if hf_id is not None:
            listings += hf_cache_listings(repo_folder, hf_id)
    for folder in ollama_folders():
        for manifest in sorted((folder / "manifests").glob("*/*/*/*")):
            name = OllamaName(*manifest.relative_to(folder / "manifests").parts)
            if not manifest.is_file() or parse_ollama_name(str(name)) != name:
                continue
            try:
                listings.append(describe(PlacedModel(str(name), model_blob(folder, manifest), "gguf", "Ollama")))
            except LmforgeError as error:
                listings.append(ModelListing(str(name), "Ollama", manifest, problem=str(error)))
    return listings


def hf_cache_listings(repo_folder: Path, hf_id: HFId) -> list[ModelListing]:
    """A cached repository's models: its HF folder and/or each GGUF quantisation (named with :QUANT where
    the bare name would not find it); none where it holds no weights (a tokenizer or config fetched alone)."""
    try:
        snapshot = snapshot_folder(repo_folder, hf_id)
    except LmforgeError:
        return []
    ggufs = gguf_choices(snapshot)
    listings = []
    if (snapshot / "config.json").exists() and any(snapshot.glob("*.safetensors")):
        listings.append(describe(PlacedModel(hf_id.repo, snapshot, "hf", "HF cache")))
    bare = len(ggufs) == 1 and not listings
    for tag, files in ggufs.items():
        name = hf_id.repo if bare else f"{hf_id.repo}:{tag}"
        try:
            listings.append(describe(PlacedModel(name, one_gguf(files, hf_id), "gguf", "HF cache")))
        except LmforgeError as error:  # a split or unfinished download
            listings.append(ModelListing(name, "HF cache", files[0], problem=str(error)))
    return listings


def describe(model: PlacedModel) -> ModelListing:
    """What `lmforge models` shows of a model, read from headers only (config.json, safetensors' and GGUF's)."""
    listing = ModelListing(model.name, model.place, model.path)
    try:
        if model.format == "gguf":
            listing.size_bytes = model.path.stat().st_size
            listing.architecture, listing.quantisation = gguf_summary(model.path)
            supported = GGUF_ARCHITECTURES
        else:
            # what the folder's loading reads: its top-level files, GGUF files of the same repository aside
            files = [path for path in model.path.iterdir() if path.is_file() and path.suffix != ".gguf"]
            listing.size_bytes = sum(path.stat().st_size for path in files)
            listing.architecture, listing.quantisation, listing.problem = hf_summary(model.path)
            supported = HF_MODEL_TYPES
    except LmforgeError as error:
        listing.problem = str(error)
        return listing
    if listing.problem is None and listing.architecture not in supported:
        listing.problem = f"architecture {listing.architecture!r} is not supported"
    return listing


def gguf_summary(path: Path) -> tuple[str | None, str | None]:
    """(general.architecture, quantisation): general.file_type's name, else the tensor type most weights have."""
    from gguf import LlamaFileType

    from lmforge.formats.gguf_file import GGUFFile

    try:
        fields = GGUFFile(path, stop_after={"general.architecture", "general.file_type"}).fields
        file_type = fields.get("general.file_type")
        named = {member.value: member.name for member in LlamaFileType if member != LlamaFileType.GUESSED}
        if file_type in named:
            quantisation = named[file_type].removeprefix("MOSTLY_").removeprefix("ALL_")
        else:
            counts = Counter()
            for tensor in GGUFFile(path).tensors:
                counts[tensor.tensor_type.name] += math.prod(tensor.shape)
            quantisation = counts.most_common(1)[0][0] if counts else None
    except Exception as error:  # the reader raises ValueError, IndexError, struct.error, ... on damaged files
        raise LmforgeError(f"not a readable GGUF file ({type(error).__name__}: {error})") from None
    architecture = fields.get("general.architecture")
    return (architecture if isinstance(architecture, str) else None), quantisation


def hf_summary(folder: Path) -> tuple[str | None, str | None, str | None]:
    """(model_type, the dtype most weights have in the safetensors headers, a problem or None)."""
    config = read_json_object(folder / "config.json")
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict):  # GPTQ, AWQ, bitsandbytes, ...: weights lmforge does not read
        method = str(quantization.get("quant_method", "unknown"))
        return model_type, method, f"{method} quantisation is not supported"
    counts = Counter()
    for path in sorted(folder.glob("*.safetensors")):
        for dtype, elements in safetensors_dtypes(path).items():
            counts[dtype.lower()] += elements
    return model_type, (counts.most_common(1)[0][0] if counts else None), None


def safetensors_dtypes(path: Path) -> Counter:
    """dtype -> elements in a safetensors file, from its header (8 bytes of length, then JSON)."""
    try:
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > 100_000_000:
                raise ValueError(f"a {length}-byte header")
            header = json.loads(file.read(length))
        counts = Counter()
        for name, entry in header.items():
            if name != "__metadata__":
                elements = 1
                for dimension in entry["shape"]:
                    elements *= dimension
                counts[entry["dtype"]] += elements
        return counts
    except (OSError, ValueError, KeyError, TypeError, struct.error, AttributeError) as error:
        raise LmforgeError(f"{path}: not a readable safetensors file ({type(error).__name__}: {error})") from None
