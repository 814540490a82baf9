"""The report without Quarto: every chapter's code runs, its references resolve, its budgets hold.

Quarto cannot be installed on every machine that runs the tests, so we read the .qmd files
ourselves: expand `{{< include >}}` shortcodes, then run the ```{python} cells and the inline
`{python} expr` expressions top to bottom in one namespace per document, as Quarto's Jupyter
kernel would. The study runs on a tiny random GPT-2 (3 layers x 4 heads, GPT-2's tokenizer)
saved as a local model directory, with 8 prompts, so that both documents run in about a minute;
set IOI_TEST_MODEL=gpt2-small-random to run them on GPT-2 small's shape instead (many minutes).
All documents share one results cache, so the second reuses the first's analyses.
"""

from __future__ import annotations

import json
import numbers
import os
import re
import statistics
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "chapters"
DOCUMENTS = {"report.qmd": 3000, "reflection.qmd": 550}  # output -> prose word budget
MAX_FIGURES_AND_TABLES = 9  # in the report's body (the second family's circuit diagram is the ninth)

CELL = re.compile(r"^```\{python[^}]*\}[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
INLINE = re.compile(r"`\{python\}\s+([^`]+)`")
INCLUDE = re.compile(r"\{\{<\s*include\s+(\S+)\s*>\}\}")
FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.S)
REF = re.compile(r"(?<![\w@])@((?:fig|tbl|sec)-[\w-]*\w)")
CITATION = re.compile(r"(?<![\w@])@([A-Za-z_][\w]*(?:[:.#$%&+?<>~/-][\w]+)*)")
LABEL_OPTION = re.compile(r"^#\|\s*label:\s*((?:fig|tbl|sec)-[\w-]+)", re.M)
LABEL_ATTR = re.compile(r"\{#((?:fig|tbl|sec)-[\w-]+)[^}]*\}")
BACK_MATTER = re.compile(r"^#+ .*(?:\{[^}]*\.appendix[^}]*\}|References).*$", re.M)


# --- Reading .qmd --------------------------------------------------------------------------------


def expand(path: Path) -> str:
    """The document as Quarto sees it: includes replaced by the files they name, recursively."""
    text = path.read_text()
    return INCLUDE.sub(lambda m: FRONT_MATTER.sub("", expand(path.parent / m.group(1))), text)


def body(text: str) -> str:
    """The report's body: no YAML front matter, and nothing from References or the appendix on."""
    text = FRONT_MATTER.sub("", text)
    end = BACK_MATTER.search(text)
    return text[: end.start()] if end else text


def steps(text: str) -> list[tuple[str, str]]:
    """("cell", code) and ("inline", expression) in document order."""
    out, at = [], 0
    for cell in CELL.finditer(text):
        out += [("inline", e) for e in INLINE.findall(text[at : cell.start()])]
        out.append(("cell", cell.group(1)))
        at = cell.end()
    return out + [("inline", e) for e in INLINE.findall(text[at:])]


def prose(text: str) -> str:
    """Only what a reader reads as running text: no code, options, shortcodes or markup."""
    text = FENCE.sub(" ", FRONT_MATTER.sub("", text))
    text = INLINE.sub(" N ", text)  # an inline number reads as one word
    text = re.sub(r"<!--.*?-->|\{\{<.*?>\}\}|\{[#.][^}]*\}|^:::.*$", " ", text, flags=re.S | re.M)
    return re.sub(r"\[?-?@[\w:.-]+\]?", " ", text)  # citations are references; cross-refs a word at most


def word_count(text: str) -> int:
    return len(re.findall(r"[A-Za-z0-9][\w'’.,%/−-]*", prose(text)))


def figures_and_tables(text: str) -> int:
    labels = set(LABEL_OPTION.findall(text)) | set(LABEL_ATTR.findall(text))
    return len({l for l in labels if l.startswith(("fig-", "tbl-"))})


def budget(name: str) -> dict:
    """Words of prose and figures or tables in a document's body (what the tests check)."""
    text = body(expand(CHAPTERS / name))
    return {"document": name, "words": word_count(text), "figures_and_tables": figures_and_tables(text)}


def cell_options(code: str) -> dict:
    return yaml.safe_load("\n".join(l[3:] for l in code.splitlines() if l.startswith("#|"))) or {}


# --- Running the code ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chapter_env(tmp_path_factory):
    """Environment of a small render: a tiny model, 8 prompts, one shared results cache."""
    cache = tmp_path_factory.mktemp("ioi-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IOI_CACHE_DIR", str(cache))
        mp.chdir(CHAPTERS)  # Quarto runs a document's code in the document's directory
        mp.delenv("QUARTO_EXECUTE_INFO", raising=False)
        mp.setenv("IOI_MODEL", os.environ.get("IOI_TEST_MODEL") or str(_tiny_gpt2(cache / "tiny-gpt2")))
        mp.setenv("IOI_FOLLOWUP_MODELS", os.environ["IOI_MODEL"])  # the size follow-up on the tiny model alone
        for name, value in {"IOI_N": "8", "IOI_N_PATH": "4", "IOI_TOP_HEADS": "4"}.items():
            mp.setenv(name, value)
        yield


def _tiny_gpt2(directory: Path) -> Path:
    """A random GPT-2 of 3 layers x 4 heads with GPT-2's tokenizer, as a model directory."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from ioi.weights import gpt2_tokenizer_directory

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=128))
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(gpt2_tokenizer_directory()).save_pretrained(directory)
    return directory


def run_document(name: str) -> dict:
    """Run a document's cells and inline expressions in one namespace; render each cell's
    displayed value as Quarto would ask for it, so a broken chart or table fails here."""
    namespace: dict = {"__name__": "__main__"}
    for kind, code in steps(expand(CHAPTERS / name)):
        if kind == "inline":
            value = eval(compile(code, f"<{name} inline>", "eval"), namespace)
            # a number or text: an object or a frame would print its repr into the prose
            assert isinstance(value, (numbers.Number, str)) and not isinstance(value, bool), (code, type(value))
            assert str(value).strip(), code
            continue
        statements, last = _split_last(code)
        exec(compile(statements, f"<{name} cell>", "exec"), namespace)
        if last:
            _display(eval(compile(last, f"<{name} cell>", "eval"), namespace))
    return namespace


def _split_last(code: str) -> tuple[str, str | None]:
    """A cell's statements, and its last line when that is an expression (the displayed value)."""
    import ast

    tree = ast.parse(code)
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        return ast.unparse(ast.Module(tree.body[:-1], [])), ast.unparse(tree.body[-1])
    return code, None


def _display(value) -> None:
    if hasattr(value, "to_dict"):  # an altair chart: validate its spec against the schema
        value.to_dict()
    for method in ("_repr_markdown_", "_repr_png_", "_repr_svg_", "_repr_html_"):
        if hasattr(value, method):
            getattr(value, method)()


@pytest.mark.parametrize("name", list(DOCUMENTS))
def test_document_code_runs_top_to_bottom(name, chapter_env):
    """Every cell and inline expression of the document runs, in order, in one namespace."""
    namespace = run_document(name)
    assert namespace["study"].config.n == 8


def test_study_figures_draw_every_figure_from_the_cached_study(chapter_env):
    """`figures.study_figures`, which `python -m ioi reproduce` saves, gives valid charts."""
    from ioi.report import figures
    from ioi.study import Study, StudyConfig

    study = Study(StudyConfig(model=os.environ["IOI_MODEL"], n=8, n_path=4, top_heads=4))
    figures = figures.study_figures(study)
    assert {"heads", "residual", "path_patching", "circuit", "faithfulness_by_template"} <= set(figures)
    for chart in figures.values():
        chart.to_dict()


def test_reproduce_writes_every_table_figure_and_the_summary(chapter_env, tmp_path):
    """`python -m ioi reproduce`'s outputs: a CSV per analysis, the study's figures as SVG, and
    summary.json with the setup, headline numbers, timings and peak memory; nothing half-written."""
    from ioi.reproduce import TABLES, reproduce
    from ioi.study import Study, StudyConfig

    study = Study(StudyConfig(model=os.environ["IOI_MODEL"], n=8, n_path=4, top_heads=4))
    summary = reproduce(study, tmp_path)
    written = {p.stem for p in (tmp_path / "tables").glob("*.csv")}
    assert written | set(summary["not_run"]) == set(TABLES) and not written & set(summary["not_run"])
    assert set(summary["not_run"]) <= {"backup", "name_mover_attention", "position_token"}
    assert len(list((tmp_path / "figures").glob("*.svg"))) >= 5
    assert not list(tmp_path.rglob("*.tmp"))
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert {"setup", "baseline", "faithfulness", "seconds", "seconds_per_analysis", "peak_memory_gb"} <= set(saved)
    assert saved["baseline"]["n"] == 8 and saved["peak_memory_gb"] > 0
    assert saved["faithfulness"]["faithfulness"] == pytest.approx(summary["faithfulness"]["faithfulness"])


# --- Static checks -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DOCUMENTS))
def test_cross_references_have_labels(name):
    """Every @fig-, @tbl- and @sec- reference names a label defined in the same document."""
    text = expand(CHAPTERS / name)
    labels = set(LABEL_OPTION.findall(text)) | set(LABEL_ATTR.findall(text))
    missing = set(REF.findall(prose_and_captions(text))) - labels
    assert not missing, f"unresolved cross-references in {name}: {sorted(missing)}"


def prose_and_captions(text: str) -> str:
    """Text where a reference can appear: prose, inline code removed, and cell captions."""
    captions = " ".join(str(v) for c in CELL.findall(text) for k, v in cell_options(c).items() if k.endswith("cap"))
    return INLINE.sub(" ", FENCE.sub(" ", text)) + " " + captions


@pytest.mark.parametrize("name", list(DOCUMENTS))
def test_citations_exist_in_bibliography(name):
    """Every citation key in a document is an entry of references.bib."""
    keys = set(re.findall(r"^@\w+\{([^,\s]+),", (ROOT / "references.bib").read_text(), re.M))
    text = FRONT_MATTER.sub("", expand(CHAPTERS / name))
    cited = {k for k in CITATION.findall(prose_and_captions(text)) if not re.match(r"(fig|tbl|sec|eq)-", k)}
    assert cited, f"{name} cites nothing"
    assert not cited - keys, f"citations missing from references.bib: {sorted(cited - keys)}"


def test_bibliography_has_the_required_works():
    """The sixteen works the report builds on are all in references.bib."""
    keys = set(re.findall(r"^@\w+\{([^,\s]+),", (ROOT / "references.bib").read_text(), re.M))
    required = {"wang2022", "elhage2021", "olsson2022", "conmy2023", "miller2024", "heimersheim2024",
                "zhang2024", "nanda2023attribution", "hanna2024", "tigges2024", "nanda2022transformerlens",
                "meng2022", "goldowskydill2023", "mcgrath2023", "merullo2024", "allal2025"}
    assert required <= keys, sorted(required - keys)


@pytest.mark.parametrize("name,limit", list(DOCUMENTS.items()))
def test_word_budget_holds(name, limit):
    """Prose in the body (no code, YAML, references or appendix) stays within the page budget."""
    counts = budget(name)
    assert counts["words"] <= limit, counts
    assert counts["figures_and_tables"] <= MAX_FIGURES_AND_TABLES, counts


def test_every_figure_and_table_is_labelled_captioned_and_described():
    """Figure cells carry label, fig-cap and fig-alt; table cells carry label and tbl-cap."""
    for path in sorted(CHAPTERS.glob("*.qmd")):
        for code in CELL.findall(path.read_text()):
            options = cell_options(code)
            label = str(options.get("label", ""))
            if label.startswith("fig-"):
                assert {"fig-cap", "fig-alt"} <= set(options), f"{path.name}: {label}"
            if label.startswith("tbl-"):
                assert "tbl-cap" in options, f"{path.name}: {label}"


def test_code_cells_are_small():
    """Cells read like R for Data Science's: median of about three lines of code."""
    sizes = [
        len([l for l in code.splitlines() if l.strip() and not l.startswith("#|")])
        for path in CHAPTERS.glob("*.qmd") for code in CELL.findall(path.read_text())
    ]
    assert statistics.median(sizes) <= 4 and max(sizes) <= 10, sizes


def test_report_includes_the_follow_ups():
    """The follow-ups section (written separately) is part of the report."""
    assert "followups.qmd" in INCLUDE.findall((CHAPTERS / "report.qmd").read_text())
    assert (CHAPTERS / "followups.qmd").exists()


def test_quarto_project_parses_and_renders_both_outputs():
    """_quarto.yml parses, renders the report and the reflection as HTML and Typst, and never
    serves a frozen or cell-cached result (both key on the source alone, not on the library)."""
    config = yaml.safe_load((ROOT / "_quarto.yml").read_text())
    assert {"chapters/report.qmd", "chapters/reflection.qmd"} <= set(config["project"]["render"])
    assert {"html", "typst"} <= set(config["format"])
    assert config["execute"]["freeze"] is False and config["execute"]["cache"] is False
    assert config["bibliography"] == "references.bib"
    offline = yaml.safe_load((ROOT / "_quarto-offline.yml").read_text())
    assert "execute" not in offline  # the profile inherits that


@pytest.mark.parametrize("file,model", [("_environment", "gpt2-small"), ("_environment-offline", "smollm2-135m")])
def test_environment_files_choose_the_model(file, model):
    """Each profile's environment file sets IOI_MODEL (the one place it is chosen) and IOI_N."""
    lines = [l for l in (ROOT / file).read_text().splitlines() if l.strip() and not l.startswith("#")]
    values = dict(l.split("=", 1) for l in lines)
    assert values["IOI_MODEL"] == model
    assert int(values["IOI_N"]) > 0


def test_prose_never_names_a_model_by_hand():
    """Model-dependent prose reads the model from the study, so no chapter hard-codes a result
    for one model: the only model names in prose are in citations' context."""
    for path in CHAPTERS.glob("_*.qmd"):
        text = prose(path.read_text())
        assert "smollm2-135m" not in text and "gpt2-small" not in text, path.name
