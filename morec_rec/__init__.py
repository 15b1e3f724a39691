"""MoRec for TorchRec: multi-objective recommendation through adaptive data sampling.

The public surface: a job makes one :class:`MoRec` per rank from a prepared dataset, its
own collate, the per-example losses of its model (``rows``) and its scorer, then trains
on ``MoRec.loader`` with ``MoRec.loss(model)`` as its loss and calls ``MoRec.validate``
every few hundred steps. Objectives are :class:`Objective` s: the four built-ins, or a
job's own subclass. ``MoRecConfig.coordinator`` swaps MoRec's coordinator for a baseline
(static weights, MGDA, Pareto MTL, EPO), whose hook is a :class:`BaselineLoss`.
"""

from morec_rec.config import HoldTarget, MoRecConfig, SamplerConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.errors import MorecError
from morec_rec.plugin.baseline import BaselineLoss, Representation
from morec_rec.plugin.control.coordinator import Coordinator
from morec_rec.plugin.eval.metrics import RankingMetrics
from morec_rec.plugin.eval.ranking import RankingTask, Scorer
from morec_rec.plugin.hook import MoRecLoss, Rows
from morec_rec.plugin.loader import Collate, MoRecLoader
from morec_rec.plugin.morec import MoRec
from morec_rec.plugin.sampling.objectives import (
    Accuracy,
    Alignment,
    Fairness,
    Objective,
    Revenue,
    ValidationSignal,
)
from morec_rec.plugin.sampling.sampled import SampledBatch
from morec_rec.plugin.segments import ExampleLayout, SegmentedBatch
from morec_rec.version import __version__

__all__ = [
    "Accuracy",
    "Alignment",
    "BaselineLoss",
    "Collate",
    "Coordinator",
    "ExampleLayout",
    "Fairness",
    "HoldTarget",
    "MoRec",
    "MoRecConfig",
    "MoRecLoader",
    "MoRecLoss",
    "MorecError",
    "Objective",
    "PreparedDataset",
    "RankingMetrics",
    "RankingTask",
    "Representation",
    "Revenue",
    "Rows",
    "SampledBatch",
    "SamplerConfig",
    "Scorer",
    "SegmentedBatch",
    "ValidationSignal",
    "__version__",
]
