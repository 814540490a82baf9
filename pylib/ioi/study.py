"""One IOI study: a model, its clean and ABC datasets, and every analysis of the paper, cached.

The report's chapters and the command line both go through `Study`, so that they compute the
same numbers and share one results cache: a chapter that asks for `study.head_patching()` after
`python -m ioi reproduce` ran gets the stored table in milliseconds.

    study = Study(StudyConfig(model="smollm2-135m", n=100, seed=0))
    study.baseline_summary()       # logit difference, IO probability, IO > S, with 95% CIs
    study.head_attributions()      # direct logit attribution per head
    study.circuit()                # the paper's circuit on GPT-2 small, else one found the paper's way

The model is loaded only when an analysis has to compute: a study whose results are all cached
reads them without it (its datasets and shape are cached too, under a digest of the model's
files, `ioi.weights.fingerprint`), so a warm report renders without holding any model.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from ioi import metrics
from ioi.analyses import adversarial, head_scores, logit_attribution
from ioi.cache import cached, model_fingerprint
from ioi.circuits import classes, criteria, curve, discovery, knockouts, paths_discovery, s_inhibition
from ioi.circuits.curve import CurveConfig
from ioi.circuits.paths_discovery import PathsConfig
from ioi.dataset import corrupt, make_dataset
from ioi.engines import attribution, auto, check
from ioi.models import load_model, return_free_memory, trained_with_bos
from ioi.weights import RANDOM_MODELS, fingerprint, source


@dataclass(frozen=True)
class StudyConfig:
    model: str = "gpt2-small"  # the paper's model
    n: int = 100  # prompts; the paper's path patching uses over 200
    seed: int = 0  # draws the prompts and the ABC names; recorded with every result
    templates: str = "mixed"  # the paper's default: 7 BABA templates and their ABBA versions
    # None: the model's convention (`models.trained_with_bos`): none for GPT-2, as in the paper;
    # a BOS for models whose every training sequence began with one (Gemma)
    prepend_bos: bool | None = None
    n_path: int = 100  # prompts for the path-patching sweeps (the paper uses over 200)
    top_heads: int = 20  # heads whose queries, keys, values and patterns are patched
    faithfulness_target: float = 0.8  # share of F(M) a found circuit must keep
    greedy_candidates: int | None = 10  # heads run exactly per greedy completeness step (None: all)
    paths: PathsConfig = PathsConfig()  # thresholds of the paper-way circuit discovery
    curve: CurveConfig = CurveConfig()  # grid and random seeds of the faithfulness curve
    device: str = "cpu"


# The config fields every result depends on; `uses` adds the few that only some analyses read,
# so that e.g. a study with another n_path shares its baseline with this one.
KEY_FIELDS = ("model", "n", "seed", "templates", "prepend_bos", "faithfulness_target")


def _analysis(method=None, *, uses: tuple[str, ...] = ()):
    """Cache a Study method's result under its name, the config fields it depends on, its
    arguments and the study's model and datasets."""
    if method is None:
        return functools.partial(_analysis, uses=uses)

    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        config = {f: getattr(self.config, f) for f in KEY_FIELDS + uses}
        # keyed on every argument's value, defaults included, so that head_patching() and
        # head_patching("all") are one result
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        params = {"config": config, "arguments": dict(list(bound.arguments.items())[1:])}
        start = time.perf_counter()
        result = cached(
            method.__name__, lambda: _freeing(method(self, *args, **kwargs)), params,
            self.model_fingerprint, (self.clean, self.corrupted),
        )
        # summed, so a later cache hit does not hide what the first call cost
        elapsed = time.perf_counter() - start
        self.timings[method.__name__] = self.timings.get(method.__name__, 0.0) + elapsed
        return result

    return wrapper


def _freeing(result):
    """`result`, once what computing it freed is handed back (`return_free_memory`): so that the
    next analysis's peak does not stack on this one's high-water mark."""
    return_free_memory()
    return result


class Study:
    def __init__(self, config: StudyConfig = StudyConfig(), *, model_from: Study | None = None):
        self._model = None  # loaded on first use (`model`), held until `release_model`
        # Where the weights come from, resolved once, so that the files digested into every
        # result's key are the files loaded (a hub that answers the digest and not the load, or the
        # reverse, would key results on one copy and compute them on another). A `variant` borrows both.
        if model_from is not None:
            self._where, self._load = model_from._where, lambda: model_from.model
        else:
            self._where = None if config.model in RANDOM_MODELS else source(config.model)
            self._load = functools.partial(load_model, config.model, config.device, where=self._where)
        inputs = _inputs(config, self._where, lambda: self.model)
        self.config: StudyConfig = inputs["config"]  # prepend_bos resolved
        self.clean, self.corrupted = inputs["clean"], inputs["corrupted"]
        self.shape: dict = inputs["shape"]  # n_layers, n_heads, n_params
        self.model_fingerprint: str = inputs["model_fingerprint"]  # what the results are keyed on
        self.unsupported_features: list[str] = inputs["unsupported_features"]  # by the fast engines
        self.timings: dict[str, float] = {}

    @property
    def model(self):
        """The model, loaded on first use and held by this study until `release_model`."""
        if self._model is None:
            self._model = self._load()
        return self._model

    def release_model(self) -> None:
        """Let the model go (a 1.5B model holds 7 GB) and hand its memory back; an analysis that
        needs it again loads it again."""
        self._model = None
        gc.collect()
        return_free_memory()

    def variant(self, **changes) -> Study:
        """This study's model under another config (other prompts, templates): a Study that borrows
        the model this one holds, loading it here if need be, rather than loading a second copy."""
        if changes.keys() & {"model", "device"}:
            raise ValueError("a variant studies the same model on the same device: make a new Study for another")
        return Study(dataclasses.replace(self.config, **changes), model_from=self)

    @property
    def path_data(self):
        """The first `n_path` prompts and their corruptions, for path patching."""
        keep = [i < self.config.n_path for i in range(len(self.clean))]
        return self.clean.subset(keep), self.corrupted.subset(keep)

    def setup(self) -> dict:
        """What the report states about the setup."""
        return {
            "model": self.config.model,
            "n": len(self.clean),
            "seed": self.config.seed,
            "bos": self.config.prepend_bos,
            "templates": self.config.templates,
            "n_templates": len(set(self.clean.template_id)),
            "names_dropped": len(self.clean.names_dropped),
            "names_dropped_list": list(self.clean.names_dropped),
            "n_layers": self.shape["n_layers"], "n_heads": self.shape["n_heads"],
        }

    # --- Baseline -----------------------------------------------------------------------------

    @_analysis
    def baseline(self) -> pd.DataFrame:
        return metrics.per_prompt_baseline(self.model, self.clean)

    def baseline_summary(self) -> pd.DataFrame:
        return metrics.baseline_summary(self.baseline(), self.config.seed)

    def baseline_json(self) -> dict:
        """The `python -m ioi baseline --json` contract."""
        summary = self.baseline_summary().set_index("metric")
        ld = summary.loc["logit_diff"]
        return {
            "model": self.config.model,
            "n": len(self.clean),
            "seed": self.config.seed,
            "logit_diff_mean": ld["mean"],
            "logit_diff_ci95": [ld.ci_low, ld.ci_high],
            "io_prob_mean": summary.loc["io_prob", "mean"],
            "io_beats_s_frac": summary.loc["io_beats_s", "mean"],
            "bos": self.config.prepend_bos,
            "names_dropped": len(self.clean.names_dropped),
        }

    # --- Attribution --------------------------------------------------------------------------

    @_analysis
    def head_attributions(self) -> pd.DataFrame:
        return logit_attribution.head_attributions(self.model, self.clean, self.config.seed)

    @_analysis
    def per_prompt_head_dla(self) -> pd.DataFrame:
        """Every head's direct logit attribution on every clean prompt."""
        frame = logit_attribution.per_prompt_attributions(self.model, self.clean)
        return frame[frame.component == "head"][["prompt_index", "layer", "head", "dla"]].reset_index(drop=True)

    @_analysis
    def layer_attributions(self) -> pd.DataFrame:
        return logit_attribution.layer_attributions(self.model, self.clean, self.config.seed)

    @_analysis
    def logit_lens(self) -> pd.DataFrame:
        return logit_attribution.logit_lens(self.model, self.clean, self.config.seed)

    # --- Activation patching -----------------------------------------------------------------

    @_analysis
    def residual_patching(self) -> pd.DataFrame:
        """The residual stream before each layer at each named position (fast, exact)."""
        return self._normalised(auto.residual_patching(self.model, self.clean, self.corrupted))

    @_analysis
    def layer_patching(self) -> pd.DataFrame:
        """Each layer's whole attention and MLP output, all positions."""
        return self._normalised(auto.layer_patching(self.model, self.clean, self.corrupted))

    @_analysis
    def head_patching(self, positions: str = "all") -> pd.DataFrame:
        """Each head's output patched at every position ("all") or at END only ("end"),
        computed by the fast exact engine where it is verified on the model (`ioi.engines.auto`)."""
        return self._normalised(auto.head_patching(self.model, self.clean, self.corrupted, positions))

    def _normalised(self, frame: pd.DataFrame) -> pd.DataFrame:
        clean_ld, corrupted_ld = self.clean_and_corrupted_logit_diff()
        return frame.assign(patched_metric=metrics.normalised(frame.logit_diff, clean_ld, corrupted_ld))

    @_analysis
    def clean_and_corrupted_logit_diff(self) -> tuple[float, float]:
        """Mean logit difference of the clean and of the ABC run: the metric's 1 and 0."""
        def mean_logit_diff(dataset) -> float:  # of the clean prompts' IO and S tokens
            end_logits = metrics.run_end_logits(self.model, dataset)
            return metrics.logit_diff_from_end(end_logits, self.clean.io_token, self.clean.s_token).mean().item()

        return mean_logit_diff(self.clean), mean_logit_diff(self.corrupted)

    def top_heads(self, k: int | None = None) -> list[tuple[int, int]]:
        """The heads whose all-position patching moves the metric most."""
        table = self.head_patching()
        table = table.assign(size=(table.patched_metric).abs()).nlargest(k or self.config.top_heads, "size")
        return [(int(l), int(h)) for l, h in zip(table.layer, table["head"])]

    @_analysis(uses=("top_heads",))
    def head_input_patching(self) -> pd.DataFrame:
        """Queries, keys, values and patterns of the top heads, patched one at a time (fast, exact)."""
        return self._normalised(auto.head_input_patching(self.model, self.clean, self.corrupted, self.top_heads()))

    # --- Head classes --------------------------------------------------------------------------

    @_analysis
    def head_scores(self) -> pd.DataFrame:
        """Every head's attention and copy scores on the IOI prompts and its attention scores on
        repeated random tokens (`ioi.analyses.head_scores`)."""
        rules = classes.load_rules()
        return head_scores.head_scores(self.model, self.clean, rules.random_length, rules.random_n)

    @_analysis
    def attention_patterns(self, heads: tuple, prompt: int = 0) -> pd.DataFrame:
        """Each head in `heads` attending on one clean prompt (`head_scores.attention_patterns`)."""
        return head_scores.attention_patterns(self.model, self.clean, [tuple(h) for h in heads], prompt)

    def members(self, cls: str) -> list[tuple[int, int]]:
        """The circuit's heads of class `cls` that pass the class's definition
        (`ioi.circuits.classes`): the heads an experiment on that class acts on. Off GPT-2 small
        only the discovery's steps up to the one that finds `cls` run (name movers: the direct
        paths to the logits alone)."""
        if self.config.model == "gpt2-small":
            candidates = self.circuit().classes.get(cls, ())
        else:
            step = paths_discovery.STEP_OF[cls]
            candidates = paths_discovery.to_circuit(self.paper_circuit_table(step)).classes.get(cls, ())
        scores = self.head_scores().set_index(["layer", "head"])
        rules = classes.load_rules()
        return [h for h in candidates if classes.is_member(cls, scores.loc[h], rules)]

    # --- Path patching -------------------------------------------------------------------------

    @_analysis(uses=("n_path",))
    def path_patching(self, receivers="logits", receiver_input=None, receiver_position=None, first_layer=0) -> pd.DataFrame:
        """Every head before the receivers (from `first_layer` on) as the sender of one
        path-patching sweep (fast, exact). The named sweeps below and the paper-way discovery
        share these results."""
        clean, corrupted = self.path_data
        if receivers != "logits":
            receivers = [tuple(r) for r in receivers]
        return auto.path_patching(
            self.model, clean, corrupted, receivers, receiver_input or "q", receiver_position,
            first_layer=first_layer,
        )

    def _path_patching(self, receivers, receiver_input=None, receiver_position=None, first_layer=0) -> pd.DataFrame:
        """`path_patching` with receivers in one canonical form, so equal sweeps share a cache entry."""
        if receivers == "logits":
            return self.path_patching("logits", None, None, first_layer)
        receivers = tuple(sorted((int(l), int(h)) for l, h in receivers))
        return self.path_patching(receivers, receiver_input, receiver_position, first_layer)

    def path_patching_to_logits(self) -> pd.DataFrame:
        return self._path_patching("logits")

    def path_patching_to_name_movers(self) -> pd.DataFrame:
        """Senders into the name movers' queries at END: finds the S-inhibition heads."""
        return self._path_patching(self.members("name mover"), "q", "END")

    def path_patching_to_s_inhibition(self) -> pd.DataFrame:
        """Senders into the S-inhibition heads' values at S2: finds induction and
        duplicate-token heads."""
        return self._path_patching(self.members("S-inhibition"), "v", "S2")

    def path_patching_to_induction(self) -> pd.DataFrame:
        """Senders into the induction heads' keys at S1+1: finds previous-token heads."""
        return self._path_patching(self.members("induction"), "k", "S1+1")

    # --- The circuit ---------------------------------------------------------------------------

    def circuit(self) -> criteria.Circuit:
        """The paper's 26-head circuit for GPT-2 small; for other models, the circuit found the
        paper's way, by path patching back from the logits (`paper_circuit`)."""
        if self.config.model == "gpt2-small":
            return criteria.load_circuit()
        return self.paper_circuit()

    @_analysis(uses=("n_path", "paths"))
    def paper_circuit_table(self, last_step: int = 4) -> pd.DataFrame:
        """The paper-way discovery's rows: each head over a step's threshold, its class, path
        effect, scores, check and whether it was kept (`ioi.circuits.paths_discovery`), for its
        steps up to `last_step`."""
        return paths_discovery.paper_way_circuit(
            self._path_patching, self.head_scores(), self.config.paths, classes.load_rules(), last_step)

    def paper_circuit(self) -> criteria.Circuit:
        return paths_discovery.to_circuit(self.paper_circuit_table())

    def circuit_paths(self) -> pd.DataFrame:
        """One row per head of the circuit, in the discovery table's columns: the path that puts
        it there (the discovery's own kept rows; on GPT-2 small, the paper's heads measured as the
        discovery would, unchecked: `paths_discovery.measured_paths`)."""
        if self.config.model == "gpt2-small":
            return paths_discovery.measured_paths(self.circuit(), self._path_patching)
        table = self.paper_circuit_table()
        return table[table.kept].reset_index(drop=True)

    def prompt_faithfulness(self, circuit: criteria.Circuit) -> pd.DataFrame:
        """Per prompt: template, order, F(C) with only `circuit` kept (the rest mean-ablated per
        template) and F(M), for a circuit from anywhere (another study's, say)."""
        classes_ = tuple((c, tuple(sorted(hs)), circuit.positions[c]) for c, hs in sorted(circuit.classes.items()))
        return self._prompt_faithfulness(classes_)

    @_analysis
    def _prompt_faithfulness(self, circuit_spec: tuple) -> pd.DataFrame:
        circuit = criteria.Circuit({c: tuple(map(tuple, hs)) for c, hs, _ in circuit_spec}, {c: p for c, _, p in circuit_spec})
        f_c, f_m = criteria.circuit_and_model_by_length(self.model, circuit, self.clean, self.corrupted)
        return pd.DataFrame({"template_id": self.clean.template_id, "order": self.clean.order, "F_C": f_c, "F_M": f_m})

    @_analysis
    def attribution_estimates(self) -> pd.DataFrame | None:
        """Every head's attribution-patching estimate (layer, head, estimate), where the fast
        engine is exact on the model (`ioi.engines.attribution`); None elsewhere."""
        model, clean, corrupted = self.model, self.clean, self.corrupted
        if not check.use_fast(model, clean, corrupted):
            return None
        estimate = attribution.attribute(
            model, clean.tokens, corrupted.tokens, clean.end, clean.io_token, clean.s_token).head
        return pd.DataFrame([{"layer": l, "head": h, "estimate": float(estimate[l, h])}
                             for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)])

    @_analysis
    def smallest_circuit(self) -> pd.DataFrame:
        """The fewest heads, ranked by attribution patching (activation patching where the fast
        engine is not exact), that keep the target faithfulness (`ioi.circuits.discovery`)."""
        estimates = self.attribution_estimates()
        ranking = (curve.by_size(self.head_patching(), "patched_metric") if estimates is None
                   else curve.by_size(estimates, "estimate"))
        table = discovery.smallest_top_k(self.model, self.clean, self.corrupted, ranking, self.config.faithfulness_target)
        return table.assign(method="activation patching" if estimates is None else "attribution patching")

    @_analysis
    def faithfulness(self) -> dict:
        return criteria.faithfulness(self.model, self.circuit(), self.clean, self.corrupted, self.config.seed)

    @_analysis
    def faithfulness_by_template(self) -> pd.DataFrame:
        return criteria.faithfulness_by_template(self.model, self.circuit(), self.clean, self.corrupted, self.config.seed)

    @_analysis(uses=("greedy_candidates",))
    def completeness(self) -> pd.DataFrame:
        return criteria.completeness(
            self.model, self.circuit(), self.clean, self.corrupted,
            greedy_candidates=self.config.greedy_candidates, seed=self.config.seed,
        )

    @_analysis
    def minimality(self) -> pd.DataFrame:
        return criteria.minimality(self.model, self.circuit(), self.clean, self.corrupted)

    # --- Faithfulness against circuit size ------------------------------------------------------

    @_analysis(uses=("n_path", "paths", "curve"))
    def faithfulness_curve(self) -> pd.DataFrame:
        """Faithfulness of the top-k heads of each ranking, under mean- and resample-ablation
        (`ioi.circuits.curve`); the paper-way circuit (and on GPT-2 small the paper's) as points."""
        model, clean, corrupted = self.model, self.clean, self.corrupted
        cfg = self.config.curve
        rankings = {
            ("paths", None): paths_discovery.ranking(self.paper_circuit_table(), self.head_patching()),
            ("activation patching", None): curve.by_size(self.head_patching(), "patched_metric"),
        }
        estimates = self.attribution_estimates()  # attribution patching runs on the fast model only
        if estimates is not None:
            rankings[("attribution patching", None)] = curve.by_size(estimates, "estimate")
        for seed, order in curve.random_rankings(model.cfg.n_layers, model.cfg.n_heads, cfg.random_seeds).items():
            rankings[("random", seed)] = order
        points = {"paths circuit": self.paper_circuit()}
        if self.config.model == "gpt2-small":
            points["paper circuit"] = criteria.load_circuit()
        ablations = {
            "mean": criteria.mean_ablation(model, clean, corrupted),
            "resample": criteria.resampling(model, clean, corrupted),
        }
        n_heads = model.cfg.n_layers * model.cfg.n_heads
        return curve.faithfulness_curve(
            model, clean, corrupted, rankings, ablations, curve.k_grid(n_heads, cfg.points), points, self.config.seed
        )

    def faithfulness_curve_summary(self) -> pd.DataFrame:
        n_heads = self.shape["n_layers"] * self.shape["n_heads"]
        return curve.summarise(self.faithfulness_curve(), n_heads, self.config.curve.target)

    # --- The paper's further experiments (§3.2-3.4, Fig. 8, App. A and J) ----------------------

    def backup(self) -> pd.DataFrame | None:
        """Every component's direct effect per prompt before and after mean-ablating the name
        movers (`ioi.circuits.knockouts.backup_changes`); None without name movers."""
        movers = self.members("name mover")
        return self._backup(tuple(movers)) if movers else None

    @_analysis
    def _backup(self, movers: tuple) -> pd.DataFrame:
        return knockouts.backup_changes(self.model, self.clean, self.corrupted, list(movers))

    @_analysis
    def mlp_knockout(self) -> pd.DataFrame:
        """The logit difference per prompt with every MLP after the first mean-ablated (App. J)."""
        return knockouts.mlp_knockout(self.model, self.clean, self.corrupted)

    @_analysis
    def extra_io(self) -> pd.DataFrame:
        """The adversarial prompts with two more mentions of IO, against the same prompts
        without them (Fig. 8; `ioi.analyses.adversarial`)."""
        return adversarial.extra_io(self.model, self.clean)

    def name_mover_attention(self) -> pd.DataFrame | None:
        """The name movers' attention from END to IO and S2, clean and with the S-inhibition
        heads' outputs from ABC along the path into their queries (§3.2); None without both."""
        senders, movers = self.members("S-inhibition"), self.members("name mover")
        return self._name_mover_attention(tuple(senders), tuple(movers)) if senders and movers else None

    @_analysis
    def _name_mover_attention(self, senders: tuple, movers: tuple) -> pd.DataFrame:
        return s_inhibition.name_mover_attention(self.model, self.clean, self.corrupted, list(senders), list(movers))

    def position_token(self) -> pd.DataFrame | None:
        """The S-inhibition signal split into position and token (App. A); None without
        S-inhibition heads and name movers."""
        senders, movers = self.members("S-inhibition"), self.members("name mover")
        return self._position_token(tuple(senders), tuple(movers)) if senders and movers else None

    @_analysis
    def _position_token(self, senders: tuple, movers: tuple) -> pd.DataFrame:
        return s_inhibition.position_token(self.model, self.clean, self.model.tokenizer, list(senders), list(movers))


def _inputs(config: StudyConfig, where: str | None, load: Callable[[], object]) -> dict:
    """What a study needs before any analysis: its config with the BOS convention resolved, the
    clean and ABC datasets, the model's shape, and the model's fingerprint that keys every result:
    the digest of the files it loads from (`ioi.weights.fingerprint`; the loaded model is a
    function of them and of the code and library versions, which key every result too). Cached
    under it, so that reading them never loads the model. A model without files (built in memory)
    is loaded, and its weights digested instead."""
    params = {"config": {f: getattr(config, f) for f in ("model", "n", "seed", "templates", "prepend_bos")}}
    files = None if where is None else fingerprint(config.model, where)
    compute = functools.partial(_inputs_from_model, config, files, load)
    return compute() if files is None else cached("study_inputs", compute, params, files)


def _inputs_from_model(config: StudyConfig, files: str | None, load: Callable[[], object]) -> dict:
    from ioi.engines.check import unsupported_features

    model = load()
    if config.prepend_bos is None:
        config = dataclasses.replace(config, prepend_bos=trained_with_bos(model))
    clean = make_dataset(model.tokenizer, config.n, config.seed, config.templates, config.prepend_bos)
    return {
        "config": config,
        "clean": clean,
        "corrupted": corrupt(clean, model.tokenizer, "abc"),
        "shape": {"n_layers": model.cfg.n_layers, "n_heads": model.cfg.n_heads,
                  "n_params": int(sum(p.numel() for p in model.parameters()))},
        "model_fingerprint": files or model_fingerprint(model),
        "unsupported_features": unsupported_features(model),
    }
