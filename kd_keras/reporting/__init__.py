"""Reporting: figures, HTML, the run and sweep reports, the model card, result tables."""
