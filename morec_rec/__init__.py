"""MoRec for TorchRec: multi-objective recommendation through adaptive data sampling."""

__version__ = "0.1.0"
