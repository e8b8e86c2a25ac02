"""Scoring a model: held-out loss, HellaSwag, and EleutherAI's lm-evaluation-harness."""
