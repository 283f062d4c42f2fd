"""The NLP-gap study's harness: the research code behind docs/study.md, beside the recipes that run it.

Not part of the sparse_nlp wheel: the recipes (study_lm.py, study_levers.py, study_compare.py) import it as
``study`` because Python puts a script's own folder (recipes/) first on the import path; the tests get it through
pytest's ``pythonpath`` setting in pyproject.toml.

    grid.py              which runs, their names and result files, which are done
    tables.py            study.json / .csv / .md: rows, and means over seeds
    plots.py             the study's plots; curve_plot.py (validation curves), time_plot.py (perplexity vs time)
    levers.py            one setting changed at a time, beside the study's rows
    compare.py           finished runs of different studies side by side
    small_dense.py       the small-dense references' width rule
    magnitude_budget.py  gradual magnitude pruning at the sparse runs' average weight budget
    attention_split.py   q / k / v shares of a saved GPT-2's fused attention (python recipes/study/attention_split.py)
"""
