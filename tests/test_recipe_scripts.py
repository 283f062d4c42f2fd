"""The recipes are scripts with a main(): none edits sys.path (a script's own folder, recipes/, is on the import path
already, so they import the study package as ``study``), and each one's --help prints its flags."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_no_recipe_edits_the_import_path():
    files = [path for path in RECIPES.rglob("*") if path.is_file() and "__pycache__" not in path.parts]
    assert any(path.name == "study_lm.py" for path in files)
    assert [str(path.relative_to(RECIPES)) for path in files if "sys.path" in path.read_text(errors="replace")] == []


@pytest.mark.parametrize("recipe, flag", [("train_lm", "--dense_baseline"), ("study_lm", "--seeded_methods"),
                                          ("study_levers", "--baseline_dir"), ("study_compare", "--output_dir"),
                                          ("study_equal_quality", "--sparse")])
def test_every_recipe_prints_its_help(recipe, flag, capsys):
    module = importlib.import_module(recipe)  # recipes/<recipe>.py (pytest's pythonpath: recipes/)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0 and flag in capsys.readouterr().out
