"""Evaluation: metrics that compose across regions, fairness, explanations, privacy audits."""
