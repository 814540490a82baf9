"""From a `Study` to the claims table: which of its analyses each claim of `ioi.claims` reads,
the thresholds and sentences `data/claims.json` fixes, and one row per claim.

    claims(study)                            # every claim: rule, value [95% CI], verdict, sentence
    claims(study, only=("behaviour", ...))   # some of them; only their analyses run
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ioi.circuits import classes, knockouts
from ioi.claims import (
    Finding, _logits, adversarial, backup, behaviour, completeness, direct_writers, faithfulness, induction_duplicate,
    minimality, mlp_knockout, name_movers, negative_name_movers, position_token, previous_token, residual_flow,
    s_inhibition, small_circuit,
)
from ioi.dataset import DATA_DIR

CLAIMS_PATH = DATA_DIR / "claims.json"


def load_claims(path: Path = CLAIMS_PATH) -> list[dict]:
    return json.loads(Path(path).read_text())["claims"]


def shared_texts(path: Path = CLAIMS_PATH) -> dict[str, str]:
    """Sentences any claim may pick for a case of its verdict (`no preference`)."""
    return json.loads(Path(path).read_text())["texts"]


def backup_tables(study) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The name-mover knock-out per prompt and per head (`ioi.circuits.knockouts`), or Nones."""
    changes = study.backup()
    if changes is None:
        return None, None
    per_prompt = knockouts.backup_per_prompt(changes)
    per_prompt.attrs["heads"] = [f"{l}.{h}" for l, h in study.members("name mover")]
    return per_prompt, knockouts.head_rises(changes, study.config.seed)


def findings(study, specs: list[dict] | None = None) -> dict[str, Finding]:
    """Every claim's Finding on the study's model (each claim's analyses run only when it is
    asked for: give fewer specs for fewer claims)."""
    specs = specs or load_claims()
    th = {c["id"]: c["thresholds"] for c in specs}
    n_layers, n_heads = study.shape["n_layers"], study.shape["n_heads"]
    scores, dla, seed = study.head_scores(), study.head_attributions(), study.config.seed
    rules, paths = classes.load_rules(), study.config.paths
    logit_diff = float(study.baseline().logit_diff.mean())
    has = lambda cls: bool(study.members(cls))  # noqa: E731
    # The whole circuit only for the claims about it: the size follow-up asks for none of them
    circuit_size = lambda: len(study.circuit().heads)  # noqa: E731
    gather = {
        "behaviour": lambda t: behaviour(study.baseline_summary(), **t),
        "direct_writers": lambda t: direct_writers(study.per_prompt_head_dla(), n_layers, **t),
        "name_movers": lambda t: name_movers(dla, scores, rules, **t),
        "negative_name_movers": lambda t: negative_name_movers(dla, scores, rules, logit_diff, **t),
        "s_inhibition": lambda t: s_inhibition(study.name_mover_attention(), _heads(study.members("S-inhibition")),
                                               has("name mover"), seed=seed, **t),
        "induction_duplicate": lambda t: induction_duplicate(
            study.path_patching_to_s_inhibition() if has("S-inhibition") else None, scores, rules, paths.values_share),
        "previous_token": lambda t: previous_token(
            study.path_patching_to_induction() if has("induction") else None, scores, rules, paths.keys_share),
        "backup": lambda t: backup(*backup_tables(study), scores, rules, logit_diff, seed=seed, **t),
        "residual_flow": lambda t: residual_flow(study.residual_patching(), n_layers, **t),
        "faithfulness": lambda t: faithfulness(circuit_size(), study.faithfulness() if circuit_size() else {}, **t),
        "completeness": lambda t: completeness(study.completeness() if circuit_size() else None, **t),
        "minimality": lambda t: minimality(study.minimality() if circuit_size() else None, **t),
        "small_circuit": lambda t: small_circuit(study.smallest_circuit(), n_layers * n_heads, **t),
        "adversarial": lambda t: adversarial(study.extra_io(), seed=seed, **t),
        "position_token": lambda t: position_token(study.position_token(), logit_diff, seed=seed, **t),
        "mlp_knockout": lambda t: mlp_knockout(study.mlp_knockout(), seed=seed, **t),
    }
    unknown = set(th) - set(gather)
    if unknown:
        raise ValueError(f"data/claims.json names claims with no predicate: {sorted(unknown)}")
    return {claim_id: gather[claim_id](th[claim_id]) for claim_id in th}


def _heads(heads) -> list[str]:
    return [f"{l}.{h}" for l, h in heads]


def rule_values(paths) -> dict:
    """What a rule's text may name besides its own thresholds: the class definitions
    (`data/head_classes.json`) and the discovery's path shares (`PathsConfig`)."""
    rules = classes.load_rules()
    return {"margin": rules.attention_margin, "copy": rules.copy_score, "random_score": rules.random_token_score,
            "queries_share": paths.queries_share, "values_share": paths.values_share, "keys_share": paths.keys_share}


def claims(study, specs: list[dict] | None = None, only: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per claim (those named in `only`, if given): the claim, the paper's finding, the
    rule (thresholds filled in), our value with its CI, the verdict, and the facts and the
    sentence its verdict picked."""
    specs = specs or load_claims()
    if only is not None:
        unknown = set(only) - {c["id"] for c in specs}
        if unknown:
            raise ValueError(f"No such claims: {sorted(unknown)}")
        specs = [c for c in specs if c["id"] in only]
    found = findings(study, specs)
    named = rule_values(study.config.paths) | {"logit_diff": _logits(float(study.baseline().logit_diff.mean()))}
    return pd.DataFrame([claim_row(spec, found[spec["id"]], named) for spec in specs])


def claim_row(spec: dict, f: Finding, named: dict) -> dict:
    """One claim's row: its rule with the thresholds filled in, the finding, and the sentence its
    verdict (and case) picked, from the claim's own texts, else the shared ones."""
    key = f"{f.verdict}: {f.case}" if f.case else f.verdict
    text = spec["text"].get(key) or shared_texts().get(key) or spec["text"][f.verdict]
    return {
        "claim_id": spec["id"], "short": spec["short"], "claim": spec["claim"], "paper": spec["paper"],
        "rule": spec["rule"].format(**named, **spec["thresholds"]),
        "value": f.value, "ci_low": f.ci_low, "ci_high": f.ci_high, "unit": f.unit,
        "verdict": f.verdict, "facts": {**named, **spec["thresholds"], "short": spec["short"], **f.facts},
        "text": text,
    }
