"""Evaluation and interpretability: perplexity and tasks, lm-evaluation-harness, metrics, attention maps."""
