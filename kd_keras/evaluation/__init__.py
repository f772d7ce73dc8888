"""Evaluation: metrics, saved predictions, evaluating a run, paired verdicts, comparing runs."""
