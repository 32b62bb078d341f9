"""Readers of run folders and the tables and plots made from them (used by ``scripts/``)."""

from fsam.report.runs import load_metrics, load_runs
from fsam.report.tables import paper_table, reference_table, summarise

__all__ = ["load_metrics", "load_runs", "paper_table", "reference_table", "summarise"]
