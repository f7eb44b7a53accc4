"""Evaluation: evaluate_checkpoints.py (every checkpoint of a run) and report.py (summary, figures, report.md)."""
