"""The IOI dataset of Wang et al. 2022 (§2), built from small pure functions.

A prompt fills a template such as "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to"
with an indirect object IO ([A]) and a subject S ([B], said twice: S1 and S2); the model should
continue with IO. A template's ABBA version swaps the first [B] and [A], so IO comes first.

The corrupted ("ABC") distribution keeps each prompt's template, place and object and puts three
fresh, distinct names at IO, S1 and S2, so it carries the sentence structure but no information
about which name is the answer. Metrics on a corrupted prompt still read the clean IO and S tokens.

Positions are found from character offsets of the tokenised prompt, so they are right for any
tokenizer, with or without a prepended BOS token. A name that is not a single token for the
tokenizer is dropped from the name list (and counted), never silently truncated. Prompts of
different lengths are right-padded: a causal model never attends to later positions, so the
padding cannot reach END, whose true index each prompt carries.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
ROLES = ("IO", "S1", "S2")  # the three name slots of a template, in the order they first appear
POSITIONS = ("IO", "S1", "S1+1", "S2", "END")
TemplateSet = Literal["mixed", "full", "baba", "abba"]
Corruption = Literal["abc", "swap_io_s", "fresh_names"]


@dataclass(frozen=True)
class Template:
    template_id: int  # index into `all_templates()`: BABA k is 2k, its ABBA version 2k+1
    text: str  # ends just before the final " [A]", the answer
    order: Literal["ABBA", "BABA"]


@dataclass(frozen=True)
class Distribution:
    names: tuple[str, ...]
    places: tuple[str, ...]
    objects: tuple[str, ...]
    baba_templates: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class PromptRecord:
    template: Template
    names: dict  # role ("IO", "S1", "S2") -> name
    place: str
    object: str

    @property
    def io(self) -> str:
        return self.names["IO"]

    @property
    def s(self) -> str:
        return self.names["S1"]


@dataclass(frozen=True)
class IOIDataset:
    """Tokenised prompts with the index of every named position, per prompt."""

    records: tuple[PromptRecord, ...]
    prompts: tuple[str, ...]
    tokens: Int[Tensor, "batch pos"]  # right-padded with `pad_token`
    positions: dict  # "IO", "S1", "S1+1", "S2", "END" -> Int[Tensor, "batch"]
    io_token: Int[Tensor, " batch"]
    s_token: Int[Tensor, " batch"]
    prepend_bos: bool
    seed: int
    names_dropped: tuple[str, ...] = field(default=())
    corruption: str | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def end(self) -> Int[Tensor, " batch"]:
        return self.positions["END"]

    @property
    def template_id(self) -> np.ndarray:
        return np.array([r.template.template_id for r in self.records])

    @property
    def order(self) -> np.ndarray:
        return np.array([r.template.order for r in self.records])

    def subset(self, mask) -> "IOIDataset":
        """The prompts where `mask` (a boolean array over prompts) is true."""
        idx = np.flatnonzero(np.asarray(mask))
        t = torch.as_tensor(idx)
        return replace(
            self,
            records=tuple(self.records[i] for i in idx),
            prompts=tuple(self.prompts[i] for i in idx),
            tokens=self.tokens[t],
            positions={k: v[t] for k, v in self.positions.items()},
            io_token=self.io_token[t],
            s_token=self.s_token[t],
        )


# --- The distribution's facts, read from data/ ------------------------------------------------


def load_distribution(path: Path = DATA_DIR / "ioi_distribution.json") -> Distribution:
    facts = json.loads(Path(path).read_text())
    return Distribution(
        names=tuple(facts["names"]),
        places=tuple(facts["places"]),
        objects=tuple(facts["objects"]),
        baba_templates=tuple(facts["baba_templates"]),
        source=facts["source"],
    )


def abba_version(baba: str) -> str:
    """Swap the first [B] and the first [A]: "[B] and [A] ..., [B] gave" -> "[A] and [B] ..."."""
    return re.sub(r"\[B\](.*?)\[A\]", r"[A]\1[B]", baba, count=1)


def check_template(text: str) -> None:
    """A template names IO once before the answer, S twice, and ends with the answer [A]."""
    if not text.endswith(" [A]") or text.count("[A]") != 2 or text.count("[B]") != 2:
        raise ValueError(
            f"Template {text!r} must contain [A] twice (IO, then the answer at the very end, "
            "after a space) and [B] twice (S1, S2), e.g. "
            "'Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]'."
        )


def all_templates(distribution: Distribution | None = None) -> list[Template]:
    """Every BABA template and its ABBA version: ids 2k (BABA) and 2k+1 (ABBA)."""
    distribution = distribution or load_distribution()
    out = []
    for k, baba in enumerate(distribution.baba_templates):
        check_template(baba)
        for offset, (order, text) in enumerate((("BABA", baba), ("ABBA", abba_version(baba)))):
            out.append(Template(2 * k + offset, text.removesuffix(" [A]"), order))
    return out


def select_templates(which: str, distribution: Distribution | None = None) -> list[Template]:
    """The paper's default "mixed" set is the first 7 BABA templates and their ABBA versions."""
    templates = all_templates(distribution)
    if which == "mixed":
        return [t for t in templates if t.template_id < 14]
    if which == "full":
        return templates
    if which in ("baba", "abba"):
        return [t for t in templates if t.order == which.upper()]
    raise ValueError(f"Unknown template set {which!r}; use mixed, full, baba or abba.")


# --- Sampling prompts -----------------------------------------------------------------------


def single_token_names(names, tokenizer) -> tuple[list[str], list[str]]:
    """Split names into those that are one token when read as " Name", and the rest."""
    kept, dropped = [], []
    for name in names:
        ids = tokenizer(" " + name, add_special_tokens=False)["input_ids"]
        (kept if len(ids) == 1 else dropped).append(name)
    if not kept:
        raise ValueError(
            "None of the names is a single token for this tokenizer, so no IOI prompt can be "
            "built. Supply names that are (check with tokenizer(' ' + name))."
        )
    return kept, dropped


def sample_records(
    templates: list[Template], names, places, objects, n: int, rng: np.random.Generator
) -> list[PromptRecord]:
    """n prompts, templates balanced (each used n/len(templates) times, rounded), names,
    places and objects drawn uniformly; IO and S are always distinct."""
    if n <= 0:
        raise ValueError(f"The number of prompts must be positive, got n={n}.")
    if len(names) < 3:
        raise ValueError("At least three distinct single-token names are needed (for ABC).")
    order = rng.permutation(len(templates))
    records = []
    for i in range(n):
        io, s = rng.choice(names, size=2, replace=False)
        records.append(
            PromptRecord(
                template=templates[order[i % len(templates)]],
                names={"IO": str(io), "S1": str(s), "S2": str(s)},
                place=str(rng.choice(places)),
                object=str(rng.choice(objects)),
            )
        )
    return records


def corrupt_record(record: PromptRecord, kind: Corruption, names, rng) -> PromptRecord:
    """The corruptions the paper's experiments use, each keeping template, place and object.

    - abc: three fresh distinct names at IO, S1, S2 (the paper's reference distribution);
    - swap_io_s: IO and S exchanged everywhere, so the right answer becomes S;
    - fresh_names: new IO and S in the same roles (a clean prompt with other names).
    """
    used = set(record.names.values())
    fresh = [n for n in names if n not in used]
    if kind == "abc":
        a, b, c = rng.choice(fresh, size=3, replace=False)
        new = {"IO": a, "S1": b, "S2": c}
    elif kind == "swap_io_s":
        new = {"IO": record.s, "S1": record.io, "S2": record.io}
    elif kind == "fresh_names":
        a, b = rng.choice(fresh, size=2, replace=False)
        new = {"IO": a, "S1": b, "S2": b}
    else:
        raise ValueError(f"Unknown corruption {kind!r}; use abc, swap_io_s or fresh_names.")
    return replace(record, names={k: str(v) for k, v in new.items()})


# --- Text and tokens ------------------------------------------------------------------------


def fill(record: PromptRecord) -> tuple[str, dict]:
    """The prompt's text and the character span of each role's name in it."""
    text, spans, seen_b = "", {}, 0
    for piece in re.split(r"(\[A\]|\[B\]|\[PLACE\]|\[OBJECT\])", record.template.text):
        role = None
        if piece == "[A]":
            role = "IO"
        elif piece == "[B]":
            seen_b += 1
            role = "S1" if seen_b == 1 else "S2"
        if role is not None:
            value = record.names[role]
            spans.setdefault(role, (len(text), len(text) + len(value)))  # an extra IO (adversarial) is not IO's position
        else:
            value = {"[PLACE]": record.place, "[OBJECT]": record.object}.get(piece, piece)
        text += value
    return text, spans


def _token_at(offsets, span, text, tokenizer_ids, tokenizer) -> int:
    """The index of the one token that covers the character span; an error if there are more."""
    hits = [i for i, (a, b) in enumerate(offsets) if a < span[1] and b > span[0]]
    name = text[span[0] : span[1]]
    if len(hits) != 1 or tokenizer.decode([tokenizer_ids[hits[0]]]).strip() != name:
        raise ValueError(f"The name {name!r} is not a single token in {text!r}.")
    return hits[0]


def tokenize_records(
    records, tokenizer, prepend_bos: bool
) -> tuple[tuple[str, ...], Tensor, dict, Tensor, Tensor]:
    """Texts, right-padded tokens, per-prompt positions and the IO and S answer tokens."""
    bos = [_bos_id(tokenizer)] if prepend_bos else []
    texts, rows, positions = [], [], {p: [] for p in POSITIONS}
    for record in records:
        text, spans = fill(record)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        at = {r: _token_at(enc["offset_mapping"], spans[r], text, ids, tokenizer) for r in ROLES}
        at["S1+1"], at["END"] = at["S1"] + 1, len(ids) - 1
        for p in POSITIONS:
            positions[p].append(at[p] + len(bos))
        texts.append(text)
        rows.append(bos + ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _bos_id(tokenizer)
    width = max(map(len, rows))
    tokens = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    answer = lambda name: _single_token(tokenizer, name)  # noqa: E731
    io = torch.tensor([answer(r.io) for r in records])
    s = torch.tensor([answer(r.s) for r in records])
    return tuple(texts), tokens, {p: torch.tensor(v) for p, v in positions.items()}, io, s


def _single_token(tokenizer, name: str) -> int:
    ids = tokenizer(" " + name, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"The name {name!r} is not a single token for this tokenizer.")
    return ids[0]


def _bos_id(tokenizer) -> int:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ValueError("This tokenizer has neither a BOS nor an EOS token to prepend.")
    return bos


# --- The public entry points ----------------------------------------------------------------


def make_dataset(
    tokenizer,
    n: int,
    seed: int = 0,
    templates: str = "mixed",  # one of TemplateSet
    prepend_bos: bool = False,
    distribution: Distribution | None = None,
) -> IOIDataset:
    """n IOI prompts, reproducible from `seed`.

    `prepend_bos=False` is the paper's choice; TransformerLens's demos prepend one (and get
    larger logit differences), so the choice is a parameter and is recorded on the dataset.
    """
    distribution = distribution or load_distribution()
    names, dropped = single_token_names(distribution.names, tokenizer)
    rng = np.random.default_rng(seed)
    records = sample_records(
        select_templates(templates, distribution),
        names,
        distribution.places,
        distribution.objects,
        n,
        rng,
    )
    return _build(records, tokenizer, prepend_bos, seed, tuple(dropped), None)


def corrupt(
    dataset: IOIDataset, tokenizer, kind: Corruption = "abc", seed: int | None = None
) -> IOIDataset:
    """The dataset with every prompt corrupted; the answer tokens stay the clean IO and S,
    so metrics on it measure how much of the clean behaviour survives."""
    distribution = load_distribution()
    names, _ = single_token_names(distribution.names, tokenizer)
    rng = np.random.default_rng(dataset.seed + 1 if seed is None else seed)
    records = [corrupt_record(r, kind, names, rng) for r in dataset.records]
    out = _build(records, tokenizer, dataset.prepend_bos, dataset.seed, dataset.names_dropped, kind)
    if out.tokens.shape != dataset.tokens.shape or any(
        not torch.equal(out.positions[p], dataset.positions[p]) for p in POSITIONS
    ):
        raise ValueError("A corrupted prompt tokenised to a different length than its clean one.")
    return replace(out, io_token=dataset.io_token, s_token=dataset.s_token)


def _build(records, tokenizer, prepend_bos, seed, dropped, corruption) -> IOIDataset:
    prompts, tokens, positions, io, s = tokenize_records(records, tokenizer, prepend_bos)
    return IOIDataset(
        records=tuple(records),
        prompts=prompts,
        tokens=tokens,
        positions=positions,
        io_token=io,
        s_token=s,
        prepend_bos=prepend_bos,
        seed=seed,
        names_dropped=dropped,
        corruption=corruption,
    )


# --- Variants of a dataset for the paper's further experiments --------------------------------


def swap_order(dataset: IOIDataset, tokenizer) -> IOIDataset:
    """Each prompt in its template's other name order (BABA <-> ABBA) with the same names in the
    same roles: S is still the repeated name, but its first mention sits where IO's was. With
    `corrupt(..., "swap_io_s")`, it separates the position and the token of the S-inhibition
    signal (Wang et al. 2022, App. A). IO and S1 trade positions; every other position stays."""
    siblings = {t.template_id: t for t in all_templates()}
    records = [replace(r, template=siblings[r.template.template_id ^ 1]) for r in dataset.records]
    out = _build(records, tokenizer, dataset.prepend_bos, dataset.seed, dataset.names_dropped, "swap_order")
    if out.tokens.shape != dataset.tokens.shape or any(
        not torch.equal(out.positions[p], dataset.positions[p]) for p in ("S2", "END")
    ):
        raise ValueError("A prompt in its other name order tokenised to a different length.")
    return replace(out, io_token=dataset.io_token, s_token=dataset.s_token)


def with_extra_io(dataset: IOIDataset, tokenizer, sentences: str) -> tuple[IOIDataset, np.ndarray]:
    """The paper's adversarial prompts (Wang et al. 2022, Fig. 8): `sentences` (naming IO as
    "[A]") inserted after the last full stop before S2, so that IO is repeated too and the
    duplicate-token heads fire on it. Only prompts whose template has such a full stop qualify;
    returns the new prompts and the indices of the originals they come from."""
    def full_stop(text: str) -> int:  # where the last ". " before S2 (the second [B]) ends, or -1
        s2 = text.index("[B]", text.index("[B]") + 1)
        stop = text.rfind(". ", 0, s2)
        return stop + 2 if stop >= 0 else -1

    keep = [i for i, r in enumerate(dataset.records) if full_stop(r.template.text) >= 0]
    if not keep:
        raise ValueError("No prompt's template has a full stop before S2 to insert the sentences after.")
    records = []
    for i in keep:
        record = dataset.records[i]
        at = full_stop(record.template.text)
        text = record.template.text[:at] + sentences.strip() + " " + record.template.text[at:]
        records.append(replace(record, template=replace(record.template, text=text)))
    out = _build(records, tokenizer, dataset.prepend_bos, dataset.seed, dataset.names_dropped, "extra_io")
    return out, np.array(keep)


def repeated_random_tokens(tokenizer, n: int, length: int, seed: int, prepend_bos: bool) -> Int[Tensor, "n pos"]:
    """n sequences of `length` random word tokens, each repeated once (Wang et al. 2022 §3.3;
    Olsson et al. 2022), after a BOS token if `prepend_bos`. Tokens are drawn from the first
    50,000 of the vocabulary that decode to a plain word (letters, with or without a leading
    space), so no special, byte-level or unused token enters."""
    ids = range(min(len(tokenizer), 50_000))
    words = [i for i, text in zip(ids, tokenizer.batch_decode([[i] for i in ids])) if re.fullmatch(r" ?[A-Za-z]+", text)]
    if len(words) < length:
        raise ValueError(f"This tokenizer has only {len(words)} plain-word tokens; {length} are needed.")
    rng = np.random.default_rng([seed, length])  # its own stream: the prompts' draws are untouched
    first = torch.tensor(np.array([rng.choice(words, size=length, replace=False) for _ in range(n)]))
    tokens = torch.cat([first, first], dim=1)
    if prepend_bos:
        tokens = torch.cat([torch.full((n, 1), _bos_id(tokenizer)), tokens], dim=1)
    return tokens
