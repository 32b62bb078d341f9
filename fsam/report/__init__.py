"""Readers of run folders and the tables, figures and wandb uploads made from them (used by ``scripts/``)."""

from fsam.report.runs import load_metrics, load_runs
from fsam.report.tables import paper_layout, reference_table, settings_table, summarise, to_latex

__all__ = ["load_metrics", "load_runs", "paper_layout", "reference_table", "settings_table", "summarise", "to_latex"]
