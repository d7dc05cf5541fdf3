"""Studies: commands that run a setting × seed grid of trainings and report mean ± 95 % intervals.

:mod:`~lightning_lnsgd.examples.studies.runner` is the shared machinery (resumable runs over worker processes,
t-intervals, CSV/markdown tables, figure saving); each study is a module run as
``python -m lightning_lnsgd.examples.studies.<name>``.
"""

from .runner import (
    RunResult,
    Setting,
    mean_ci,
    mean_ci_text,
    run_study,
    save_figure,
    study_parser,
    summarize,
    t_quantile,
    write_tables,
)

__all__ = [
    "RunResult",
    "Setting",
    "mean_ci",
    "mean_ci_text",
    "run_study",
    "save_figure",
    "study_parser",
    "summarize",
    "t_quantile",
    "write_tables",
]
