"""The whole project rendered by Quarto, as a reader gets it: report and reflection, HTML and
Typst PDF, on a tiny random model (3 layers x 4 heads, 8 prompts) so that it takes minutes.

test_chapters.py runs the chapters' code without Quarto; this test runs Quarto itself and reads
what comes out. It fails if the render fails; if a Python repr (`np.int64(142)`, `nan`, `None`,
a DataFrame's `dtype:` footer, an object's `<... at 0x...>`) reaches the text of either format; if
a labelled figure or table is missing from either format; or if the HTML needs the network (a
script loaded from a URL, a CDN address, a chart without the inlined Vega bundle).

The second-family follow-up runs on a tiny random Llama (another family than the main tiny
GPT-2) and the size follow-up on the tiny GPT-2, so that every figure of the report is drawn.

Quarto is found as `make report` finds it: $QUARTO, then `quarto` on PATH, then the venv's
`quarto-cli`. CI installs it from ../shared/tools/quarto (see .ci/run); without it the test is
skipped, saying so.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "chapters"
DOCUMENTS = ("report", "reflection")
PROJECT_FILES = ("_quarto.yml", "_quarto-offline.yml", "_environment", "_environment-offline", "references.bib")

INCLUDE = re.compile(r"\{\{<\s*include\s+(\S+)\s*>\}\}")
LABEL = re.compile(r"^#\|\s*label:\s*((?:fig|tbl)-[\w-]+)", re.M)
LEAKS = {
    "numpy repr": re.compile(r"np\.(?:int|float|bool|str)\w*\("),
    "nan": re.compile(r"\b(?:nan|NaN)\b"),
    "None": re.compile(r"\bNone\b"),
    "pandas footer": re.compile(r"\b(?:dtype|Name): \w+"),
    "object repr": re.compile(r"<[\w.]+ (?:object )?at 0x[0-9a-f]+>"),
    "traceback": re.compile(r"Traceback \(most recent call last\)|\w+Error: "),
}
NETWORK = {
    "script from a URL": re.compile(r"<script[^>]*\bsrc=[\"']?(?:https?:)?//", re.I),
    "stylesheet from a URL": re.compile(r"<link[^>]*\bhref=[\"']?(?:https?:)?//[^>]*stylesheet|<link[^>]*stylesheet[^>]*\bhref=[\"']?(?:https?:)?//", re.I),
    "CDN": re.compile(r"cdn\.jsdelivr|unpkg\.com|cdnjs\.|https://cdn\.", re.I),
    "ES module import from a URL": re.compile(r"\bimport\b[^;\n]*from\s*[\"']https?://"),
}


def find_quarto() -> str | None:
    """$QUARTO, then `quarto` on PATH, then the one `pip install quarto-cli` puts beside Python."""
    for candidate in (os.environ.get("QUARTO"), shutil.which("quarto"), str(Path(sys.executable).with_name("quarto"))):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def expand(path: Path) -> str:
    return INCLUDE.sub(lambda m: expand(path.parent / m.group(1)), path.read_text())


def expected_labels(document: str) -> set[str]:
    return set(LABEL.findall(expand(CHAPTERS / f"{document}.qmd")))


def _tiny_models(directory: Path) -> tuple[Path, Path]:
    """A random GPT-2 (the study's model) and a random Llama with grouped-query attention (the
    second family), 3 layers x 4 heads each, saved with their real tokenizers."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from ioi.weights import _smollm2_directory, gpt2_tokenizer_directory

    built = []
    for name, make, tokenizer in (
        ("tiny-gpt2", lambda: GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=128)),
         gpt2_tokenizer_directory()),
        ("tiny-llama", lambda: LlamaForCausalLM(LlamaConfig(
            vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)),
         _smollm2_directory()),
    ):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = make()
        model.save_pretrained(directory / name)
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(directory / name)
        built.append(directory / name)
    return built[0], built[1]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """The project rendered into a temporary copy (nothing is written into the checkout)."""
    quarto = find_quarto()
    if quarto is None:
        pytest.skip("Quarto not found: set QUARTO, put `quarto` on PATH, or install it with "
                    "`bash ../shared/tools/quarto/install.sh PREFIX` (as .ci/run does)")
    work = tmp_path_factory.mktemp("render")
    project = work / "project"
    shutil.copytree(CHAPTERS, project / "chapters", ignore=shutil.ignore_patterns("*_files", "*.quarto_ipynb", ".jupyter_cache"))
    for name in PROJECT_FILES:
        shutil.copy(ROOT / name, project / name)
    gpt2, llama = _tiny_models(work / "models")
    env = {
        **os.environ,
        "QUARTO_PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "pylib"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "IOI_CACHE_DIR": str(work / "cache"),
        "IOI_MODEL": str(gpt2), "IOI_N": "8", "IOI_N_PATH": "4", "IOI_TOP_HEADS": "4",
        "IOI_FOLLOWUP_MODELS": str(gpt2), "IOI_EXTENSION_MODEL": str(llama),
    }
    out = work / "out"
    # the offline profile: no freeze, no Jupyter cache (the shell's IOI_* override its _environment)
    result = subprocess.run(
        [quarto, "render", "--profile", "offline", "--output-dir", str(out)],
        cwd=project, env=env, capture_output=True, text=True, timeout=1800,
    )
    log = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)
    error = log.find("An error occurred")  # Quarto names the failing cell here
    log = log[max(0, error - 500): error + 4000] if error >= 0 else log[-6000:]
    assert result.returncode == 0, f"quarto render failed:\n{log}"
    for document in DOCUMENTS:
        for suffix in (".html", ".pdf"):
            assert (out / "chapters" / f"{document}{suffix}").exists() or (out / f"{document}{suffix}").exists(), (document, suffix, log)
    return out


def output(out: Path, document: str, suffix: str) -> Path:
    nested = out / "chapters" / f"{document}{suffix}"
    return nested if nested.exists() else out / f"{document}{suffix}"


def html_text(path: Path) -> str:
    """What a reader of the HTML reads: no scripts, styles or tags."""
    page = re.sub(r"<(script|style)\b.*?</\1>", " ", path.read_text(), flags=re.S | re.I)
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def pdf_text(path: Path) -> str:
    pdftotext = shutil.which("pdftotext")
    if pdftotext is None:
        pytest.fail("pdftotext not found: install poppler-utils (apt-get install poppler-utils)")
    return subprocess.run([pdftotext, "-layout", str(path), "-"], capture_output=True, text=True, check=True).stdout


def leaks(text: str) -> dict[str, list[str]]:
    found = {}
    for name, pattern in LEAKS.items():
        hits = [text[max(0, m.start() - 60): m.end() + 60].replace("\n", " ") for m in pattern.finditer(text)]
        if hits:
            found[name] = hits[:3]
    return found


@pytest.mark.parametrize("document", DOCUMENTS)
def test_no_python_repr_in_the_html(rendered, document):
    assert not leaks(html_text(output(rendered, document, ".html")))


@pytest.mark.parametrize("document", DOCUMENTS)
def test_no_python_repr_in_the_pdf(rendered, document):
    assert not leaks(pdf_text(output(rendered, document, ".pdf")))


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_figure_and_table_is_in_the_html(rendered, document):
    page = output(rendered, document, ".html").read_text()
    expected = expected_labels(document)
    missing = {label for label in expected if not re.search(rf'id="{label}"', page)}
    assert not missing, f"{document}.html lacks {sorted(missing)}"
    # a figure div holds a drawing, not only its caption
    for label in (l for l in expected if l.startswith("fig-")):
        start = page.index(f'id="{label}"')
        block = page[start: page.find("</figure>", start)]
        assert re.search(r"vegaEmbed\(|<img|<svg|circuits-vis", block), f"{label} has no drawing in the HTML"


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_figure_and_table_is_in_the_pdf(rendered, document):
    text = pdf_text(output(rendered, document, ".pdf"))
    expected = expected_labels(document)
    for kind, prefix in (("Figure", "fig-"), ("Table", "tbl-")):
        want = sum(l.startswith(prefix) for l in expected)
        numbers = set(re.findall(rf"\b{kind} (\d+):", text))
        assert len(numbers) == want, f"{document}.pdf: {kind} captions {sorted(numbers, key=int)}, expected {want}"


@pytest.mark.parametrize("document", DOCUMENTS)
def test_html_needs_no_network(rendered, document):
    page = output(rendered, document, ".html").read_text()
    found = {name: pattern.findall(page)[:3] for name, pattern in NETWORK.items() if pattern.search(page)}
    assert not found, f"{document}.html loads from the network: {found}"
    charts = len(re.findall(r"vegaEmbed\(\"#", page))
    if charts:  # the Vega bundle is inlined once, before the first chart
        assert page.count("window.vegaEmbed=") == 1
        assert page.index("window.vegaEmbed=") < page.index('vegaEmbed("#')


def test_the_report_draws_every_chart_and_the_interactive_attention(rendered):
    page = output(rendered, "report", ".html").read_text()
    assert len(re.findall(r'vegaEmbed\("#', page)) >= sum(l.startswith("fig-") for l in expected_labels("report")) - 1
    assert "CircuitsVis.render(" in page  # circuitsvis's own view, its JavaScript inlined


def test_the_reflection_is_titled_for_the_model_it_measured(rendered):
    text = pdf_text(output(rendered, "reflection", ".pdf"))
    head = text[:600]
    assert "GPT-2 small" not in head and "tiny-gpt2" in head


# --- The pieces the render relies on (no Quarto needed) -----------------------------------------


def test_markdown_tables_size_columns_by_their_text():
    """The rule line gives the sentence column the most dashes; numbers align right."""
    import pandas as pd

    from ioi.report.text import MarkdownTable

    table = MarkdownTable(pd.DataFrame({"Claim": ["a claim that takes a whole sentence to state"] * 3, "Ours": [0.5, 1.25, -2.0]}))
    rule = str(table).splitlines()[1].strip("|").split("|")
    assert rule[0].startswith(":") and rule[1].endswith(":") and len(rule[0]) > 3 * len(rule[1])
    assert "−2.00" in str(table)
    verdicts = MarkdownTable(pd.DataFrame({"Claim": ["a claim that takes a whole sentence to state"] * 5,
                                           "Verdict": ["partly"] * 4 + ["not reproduced"]}))
    assert len(str(verdicts).splitlines()[1].strip("|").split("|")[1]) >= len("not reproduced")  # the longest short cell fits


def test_a_section_that_cannot_run_prints_one_sentence_and_hides_its_body():
    import pandas as pd

    from ioi.report import text

    sweep = pd.DataFrame({"model": ["gpt2-small", "gpt2-medium"], "status": ["skipped"] * 2,
                          "reason": ["gpt2-small is not in the local Hugging Face cache and the hub cannot be reached. Save it."] * 2})
    note = text.sizes_unavailable(sweep)
    assert note.count(". ") == 0 and note.endswith(".")  # one sentence
    assert text.skip_start(note).rstrip().endswith("::: {.content-hidden}") and text.skip_end(note).strip() == ":::"
    assert text.skip_start(None) == "" and text.skip_end(None) == ""
    assert text.sizes_unavailable(sweep.assign(status=["ok", "skipped"])) is None
    # the second-family follow-up never repeats the main model
    assert "main study's own" in text.extension_unavailable("smollm2-135m", "smollm2-135m")
    assert text.extension_unavailable("gemma3-270m", "smollm2-135m") is None
    assert "2.0×" in text.confounds("smollm2-135m", "gemma3-270m") and "instruction-tuned" in text.confounds("smollm2-135m", "gemma3-270m")
