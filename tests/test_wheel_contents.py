"""The wheel holds the library, not the research harness: nothing of the study (recipes/study/, or the names its
modules had under sparse_nlp/lm/), no recipe, no module that imports the study; and it still holds sparse_nlp.lm's
corpus, perplexity metric and the function that trains one model.

The wheel is built from a copy of the checkout (build outputs stay out of the source tree) by setuptools' PEP 517
backend in-process, as pip would build it, without network: a few seconds.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The study's modules as they were named in sparse_nlp/lm/ before they moved to recipes/study/.
FORMER_STUDY_MODULES = ("study", "study_tables", "study_levers", "study_compare", "study_plots", "curve_plots",
                        "time_plot", "small_dense", "magnitude_budget", "attention_split")
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "venv", "runs", "outputs", "build", "dist", "*.egg-info",
                                    "__pycache__", ".pytest_cache")
BUILD = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    folder = tmp_path_factory.mktemp("wheel")
    source, out = folder / "source", folder / "dist"
    shutil.copytree(ROOT, source, ignore=NOT_COPIED)
    built = subprocess.run([sys.executable, "-c", BUILD, str(out)], cwd=source, capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = out.glob("*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_the_wheel_holds_no_study_code(wheel):
    names = wheel.namelist()
    assert [n for n in names if "study" in Path(n).parts or n.startswith("recipes/")] == []
    assert [n for n in names if n.startswith("sparse_nlp/lm/") and Path(n).stem in FORMER_STUDY_MODULES] == []
    imports_study = re.compile(r"^\s*(from|import)\s+study\b", re.MULTILINE)  # the harness's package name
    assert [n for n in names if n.endswith(".py") and imports_study.search(wheel.read(n).decode("utf-8"))] == []


def test_the_wheel_still_holds_the_language_model_library_and_its_data(wheel):
    names = set(wheel.namelist())
    corpus = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "sparse_nlp" / "lm" / "corpus").glob("*.jsonl.xz"))
    assert corpus and set(corpus) <= names
    assert "sparse_nlp/lm/corpus/README.md" in names
    assert any(n.startswith("sparse_nlp/lm/metrics/perplexity/") and n.endswith(".py") for n in names)
    for module in ("data", "tokenizer", "evaluation", "sequence_length", "reporting", "arguments", "training"):
        assert f"sparse_nlp/lm/{module}.py" in names
