"""Sampling: objectives, the weight store, and the streaming sampler."""
