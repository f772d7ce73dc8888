"""Workflows: the distill pipeline (train, evaluate, report) and sweeps of it."""
