"""Evaluation: full-ranking top-K, the metrics, and validation signals."""
