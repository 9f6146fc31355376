"""Evaluation: tuned model against prompting, metrics, baselines and checks."""
