"""Configuration: dataclasses, loaded from a TOML file, overridden by command-line flags.

Every tunable of the project is a field of one of the dataclasses below. A config file is
TOML with one table per dataclass (``[prepare]``, ``[source]``, ...); each field is also a
flag (``history_length`` → ``--history-length``). Unknown keys and out-of-range values are
errors that name the key.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import math
import numbers
import re
import textwrap
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar

from morec_rec.errors import MorecError

C = TypeVar("C")

# The options of the fields that take one of a few words (checked by every __post_init__).
PopularityRule = Literal["equal_items", "equal_interactions"]
Missing = Literal["impute", "error"]
Draw = Literal["multinomial", "exact"]
UpdateRule = Literal["additive", "multiplicative"]
FairnessSignal = Literal["loss", "hit"]
Model = Literal["mf", "sasrec"]
#: FBGEMM optimizer names (``EmbOptimType`` values).
TableOptimizer = Literal["adam", "exact_sgd", "exact_adagrad", "exact_row_wise_adagrad"]
Control = Literal["training", "validation"]
Coefficients = Literal["sampling", "loss", "loss_forms"]
CoordinatorName = Literal["morec", "static", "mgda", "pe-mtl", "epo"]


@dataclasses.dataclass(frozen=True)
class HoldTarget:
    """Where a PI controller holds an objective's controlled quantity: ``relative`` times
    its value at the base model, or the absolute ``value``. Exactly one is set, and > 0.

    Under ``validation`` control the quantity is itself relative to the base (1 there), and
    only ``relative`` targets are taken; under ``training`` control it is a mean training
    loss, and a ``relative`` target needs the base's loss measured first.
    """

    relative: float | None = None
    value: float | None = None

    def __post_init__(self) -> None:
        given = [(k, v) for k, v in (("relative", self.relative), ("value", self.value))
                 if v is not None]
        if len(given) != 1 or not given[0][1] > 0:
            raise MorecError(f"hold target {self._text()} is out of range (expected exactly "
                             "one of relative, value, > 0)")

    def _text(self) -> str:
        return "{" + ", ".join(f"{k} = {v}" for k, v in dataclasses.asdict(self).items()
                               if v is not None) + "}"


@dataclasses.dataclass
class SourceConfig:
    """How a source reader finds its fields in the raw files (``prepare`` only; each reader
    reads the fields it needs)."""

    #: User-id column of the ``generic`` and ``morec`` interaction files.
    user_column: str = "user"
    #: Item-id column of the ``generic`` and ``morec`` interaction files.
    item_column: str = "item"
    #: Time column of the ``generic`` and ``morec`` interaction files: it orders each
    #: user's interactions for the leave-one-out split. Seconds since the epoch, a
    #: timestamp or date, or ISO-8601 text (``2015-01-31T12:00:00``, taken as UTC, or with
    #: a zone: ``...+02:00``, ``...Z``); fractions of a second are dropped.
    time_column: str = "timestamp"
    #: Rating column; empty means implicit feedback (no rating filter).
    rating_column: str = ""
    #: Price column of the ``generic`` source's item table.
    price_column: str = "price"
    #: Category column of the ``generic`` source's item table (the fairness groups).
    category_column: str = "category"
    #: CSV field delimiter of the ``generic`` and ``morec`` sources; one character.
    delimiter: str = ","
    #: ``tafeng``: leading digits of PRODUCT_SUBCLASS kept as the category, 1 to 6 (2 gives
    #: 26 groups before folding).
    category_prefix: int = 2

    def __post_init__(self) -> None:
        _check_fields(self)
        _check(len(self.delimiter) == 1, "delimiter", self.delimiter, "one character")
        _check(1 <= self.category_prefix <= 6, "category_prefix", self.category_prefix, "1..6")
        interactions = ("user_column", "item_column", "time_column",
                        *(("rating_column",) if self.rating_column else ()))
        for fields in (interactions, ("item_column", "price_column", "category_column")):
            named = [getattr(self, field) for field in fields]
            repeated = sorted({c for c in named if named.count(c) > 1})
            if repeated:
                raise MorecError(f"config: {', '.join(fields)} name column(s) "
                                 f"{', '.join(map(repr, repeated))} more than once")


@dataclasses.dataclass
class PrepareConfig:
    """Preparation of a raw source into the prepared data format (``prepare``, ``synth``)."""

    #: Interactions rated below this are dropped (only where the source has ratings).
    min_rating: float = 3.0
    #: Iterative k-core: every user and item keeps at least this many interactions; >= 3,
    #: since the leave-one-out split takes two of each user's.
    k_core: int = 5
    #: Items kept in the ``history`` column (the most recent last); 0 keeps none. SASRec's
    #: sequence length: its attention takes memory in batch_size × history_length² a step.
    history_length: int = 50
    #: Popularity groups, cut over items sorted by training count; at most the number of
    #: items left after filtering (more is an error: a group would have no item).
    popularity_groups: int = 10
    #: ``equal_items``: each group holds the same number of items; ``equal_interactions``:
    #: each holds about the same number of training interactions (a group may then hold
    #: no item, where a few items hold many interactions).
    popularity_rule: PopularityRule = "equal_items"
    #: Smallest categories fold into "other" until every fairness group holds at least
    #: this share of the held-out items of the validation and of the test split; in
    #: [0, 0.5).
    min_group_share: float = 0.02
    #: Items without a price or category: ``impute`` (price = category median, category
    #: "unknown") or ``error``.
    missing: Missing = "impute"
    #: Rows per Parquet row group (the unit whose order the sampler shuffles each epoch).
    row_group_size: int = 16_384
    #: Rows per ``train/part-*.parquet`` shard; at least ``row_group_size``.
    rows_per_shard: int = 1_048_576
    #: Seeds the tie-break of same-time interactions and the order of training rows (and,
    #: for ``synth``, the generated data).
    seed: int = 0

    def __post_init__(self) -> None:
        _check_fields(self)
        _check(self.k_core >= 3, "k_core", self.k_core, ">= 3: leave-one-out needs 3 per user")
        _check(self.history_length >= 0, "history_length", self.history_length, ">= 0")
        _check(self.popularity_groups >= 1, "popularity_groups", self.popularity_groups, ">= 1")
        _check(0 <= self.min_group_share < 0.5, "min_group_share", self.min_group_share, "[0, 0.5)")
        _check(self.row_group_size >= 1, "row_group_size", self.row_group_size, ">= 1")
        _check(self.seed >= 0, "seed", self.seed, ">= 0")
        _check(
            self.rows_per_shard >= self.row_group_size,
            "rows_per_shard",
            self.rows_per_shard,
            ">= row_group_size",
        )


@dataclasses.dataclass
class SamplerConfig:
    """The weighted streaming sampler and the objectives' sampling distributions."""

    #: Objectives, one segment of each batch each, in this order (segment id = position):
    #: ``accuracy``, ``revenue``, ``fairness``, ``alignment``.
    objectives: tuple[str, ...] = ("accuracy", "revenue", "fairness", "alignment")
    #: A batch holds ``sub_batch_size * len(objectives)`` rows per rank, split between the
    #: objectives by their shares (equal unless MoRec publishes others under ``sampling``
    #: coefficients).
    sub_batch_size: int = 256
    #: Batches per window: the rows that the sampler holds and draws from at a time.
    window_batches: int = 64
    #: Group counts of a sub-batch: ``multinomial`` draws, or ``exact`` (largest-remainder
    #: rounding of mass × sub-batch size, as in FairBatch).
    draw: Draw = "multinomial"
    #: Step α of the adaptive objectives' mass update, per validation pass (> 0). 0.025 at
    #: 16 passes an epoch moves a mass as far per epoch as the paper's 0.1 at about 4.
    step: float = 0.025
    #: Smallest mass a group keeps after an update, in [0, 1).
    floor: float = 1e-3
    #: Mass update: ``additive`` (m + α·s) or ``multiplicative`` (m·exp(α·s)), then the
    #: floor and renormalisation.
    update_rule: UpdateRule = "additive"
    #: Fairness's most miserable group, the one that gains α: the largest validation
    #: ``loss`` (the method's rule) or the lowest validation ``hit`` (Hit@10, the group that
    #: min-Hit@10 measures).
    fairness_signal: FairnessSignal = "loss"
    #: Seeds the sampler's draws (the jobs of ``run`` and ``demo`` use training's
    #: ``seed``: it is no flag there, and an error in their ``[sampler]`` table).
    seed: int = 0

    def __post_init__(self) -> None:
        _check_fields(self)
        _check(len(self.objectives) >= 1, "objectives", self.objectives, "at least one")
        _check(self.sub_batch_size >= 1, "sub_batch_size", self.sub_batch_size, ">= 1")
        _check(self.window_batches >= 1, "window_batches", self.window_batches, ">= 1")
        _check(self.step > 0, "step", self.step, "> 0")
        _check(0 <= self.floor < 1, "floor", self.floor, "[0, 1)")
        _check(self.seed >= 0, "seed", self.seed, ">= 0")


@dataclasses.dataclass
class TrainConfig:
    """Training of a backbone and its early stopping (``train``; the base of ``run``)."""

    #: Backbone: ``mf`` (MF-BPR, 10 negatives) or ``sasrec`` (SASRec, 3 negatives).
    model: Model = "mf"
    #: Size of the user and item embeddings.
    embedding_dim: int = 64
    #: Learning rate of every optimizer (tables and dense parameters); > 0.
    lr: float = 1e-3
    #: L2 weight decay of every optimizer, added to the gradient; >= 0.
    weight_decay: float = 0.0
    #: The tables' optimizer, as FBGEMM names it: ``adam``, ``exact_sgd``,
    #: ``exact_adagrad`` or ``exact_row_wise_adagrad``. FBGEMM's CPU kernels have no Adam:
    #: on CPU, ``adam`` keeps the tables unsharded and updates the rows each batch touches
    #: (SparseAdam's update, averaged over the ranks, with L2 weight decay), as FBGEMM's
    #: fused Adam does on CUDA.
    table_optimizer: TableOptimizer = "adam"
    #: Training rows per batch on each rank.
    batch_size: int = 1024
    #: Negatives are drawn ∝ training count^beta (0: uniform), never the positive.
    negative_beta: float = 0.75
    #: SASRec's dropout rate, in [0, 1) (the original SASRec used 0.2 on dense data, 0.5
    #: on sparse).
    dropout: float = 0.2
    #: Most epochs of pretraining; early stopping may end it sooner.
    max_epochs: int = 50
    #: Validate every this many steps (0: at the end of each epoch only).
    eval_every: int = 0
    #: Stop after this many validations without a better validation Hit@10.
    patience: int = 3
    #: Validation users each validation ranks: a fixed sample, the same users every time,
    #: drawn with ``seed``; 0: all of them. In ``run`` and ``demo`` MoRec's validation
    #: passes measure the same sample. Every validation ranks every item for each of its
    #: users, so where users × items is large a sample bounds what validations cost (the
    #: test split is always ranked in full).
    validation_users: int = 0
    #: DataLoader worker processes per rank (0: load in the training process).
    num_workers: int = 1
    #: Batches a loader worker makes for one request of the trainer (with workers): more
    #: cost the trainer less a batch to receive, and draw more batches ahead of training,
    #: which MoRec's mass updates then reach later.
    batches_per_request: int = 4
    #: Users scored at a time in full-ranking evaluation.
    eval_chunk_users: int = 1024
    #: Save the ``last`` checkpoint every this many steps, as well as at every epoch's
    #: end (0: at epochs' ends only). A resumed run goes on from the step saved.
    checkpoint_every: int = 1000
    #: Seeds the model's initialisation, the negatives and the training order.
    seed: int = 0

    def __post_init__(self) -> None:
        _check_fields(self)
        _check(self.embedding_dim >= 1, "embedding_dim", self.embedding_dim, ">= 1")
        _check(self.lr > 0, "lr", self.lr, "> 0")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _check(self.negative_beta >= 0, "negative_beta", self.negative_beta, ">= 0")
        _check(0 <= self.dropout < 1, "dropout", self.dropout, "0 <= dropout < 1")
        _check(self.max_epochs >= 1, "max_epochs", self.max_epochs, ">= 1")
        _check(self.eval_every >= 0, "eval_every", self.eval_every, ">= 0")
        _check(self.patience >= 1, "patience", self.patience, ">= 1")
        _check(self.validation_users >= 0, "validation_users", self.validation_users, ">= 0")
        _check(self.num_workers >= 0, "num_workers", self.num_workers, ">= 0")
        _check(self.batches_per_request >= 1, "batches_per_request", self.batches_per_request,
               ">= 1")
        _check(self.eval_chunk_users >= 1, "eval_chunk_users", self.eval_chunk_users, ">= 1")
        _check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, ">= 0")
        _check(self.seed >= 0, "seed", self.seed, ">= 0")




@dataclasses.dataclass
class MoRecConfig:
    """MoRec's continued training: the objective coordinator and its controllers.

    The coefficients of the sampler's objectives are ``q_o = c_o · w_o``, with ``w = 1``
    for accuracy and ``scale · p_o`` for the others; ``c_o`` is the output β of the PI
    controller holding objective o, or 1 where none does. They weigh the objectives'
    losses or their shares of each batch (``coefficients``).
    """

    #: The objective coordinator: ``morec`` (the PI-controlled sampler), or a baseline
    #: that trains on uniformly drawn batches with each objective's loss form (the
    #: paper's Eq. 15–17) weighted into one loss: ``static`` (the fixed weights w),
    #: ``mgda`` (from the objectives' gradients; no preference), ``pe-mtl`` or ``epo``
    #: (from the gradients, with w / Σ w as their preference). A baseline has no
    #: controllers: ``hold`` and the gains are MoRec's only. Under ``loss`` coefficients a
    #: baseline keeps MoRec's sampler instead and weighs its equal sub-batches' mean
    #: losses: MoRec with the baseline as its coordinator (the paper's ablation).
    coordinator: CoordinatorName = "morec"
    #: p: preference over the objectives other than accuracy, in the sampler's order;
    #: entries >= 0 that sum to 1, > 0 under ``pe-mtl`` and ``epo`` (empty when accuracy
    #: is the only objective).
    preference: tuple[float, ...] = (0.4, 0.3, 0.3)
    #: λ: scale of the non-accuracy terms; > 0. The paper's 0.2 with β >= 0.6 leaves the
    #: accuracy term dominant even at β's lower bound, so the controller has no authority.
    scale: float = 1.0
    #: What the controllers hold: ``validation``, each held objective's validation metric
    #: relative to the base's (1 at the base, rising as the metric falls behind), stepped
    #: at each validation pass; or ``training``, its mean training loss, stepped every
    #: batch (the paper's). On Ta-Feng only validation control moved validation Hit@10,
    #: which decides validity.
    control: Control = "validation"
    #: Where the coefficients q act: ``loss``, as the weights of ``Σ_o q_o · ℓ_o`` over
    #: equal sub-batches (the paper's); or ``sampling``, as each objective's share of the
    #: batch's rows (``q / Σ q``), the loss being the batch's plain mean. Both have the same
    #: expected gradient up to scale; under Adam only the shares have authority over rows
    #: that the other objectives alone touch. ``sampling`` needs ``validation`` control:
    #: the loaders draw batches ahead, so the shares follow the controllers at validation
    #: passes, not at every step. ``loss_forms`` is MoRec without its data sampler (the
    #: paper's ablation): uniformly drawn batches, and q weighs each objective's loss form
    #: on the whole batch (as the baselines do) instead of the mean over its sub-batch;
    #: the controllers are MoRec's, under ``validation`` control.
    coefficients: Coefficients = "sampling"
    #: Objectives held by a PI controller: objective name -> its target, ``relative`` to
    #: the controlled quantity's value at the base model (under ``training`` control the
    #: base's mean loss on that objective's sub-batches, measured before continued
    #: training; under ``validation`` control, 1), or under ``training`` control an
    #: absolute ``value`` of the loss. In TOML a table, ``[morec.hold]`` with
    #: ``accuracy = { relative = 1.01 }``; as a flag, TOML's dotted keys, ``--hold
    #: accuracy.relative=1.01,fairness.relative=0.98`` (``--hold ''``: none). The default
    #: holds validation Hit@10 1% short of the base's.
    hold: dict[str, HoldTarget] = dataclasses.field(
        default_factory=lambda: {"accuracy": HoldTarget(relative=1.01)})
    #: Proportional gain of every controller, >= 0: the proportional term lies in (0, kp).
    kp: float = 0.01
    #: Integral gain of every controller, >= 0, per controller step (a batch or a
    #: validation pass, by ``control``) and unit of error. With the other defaults a 1%
    #: shortfall held for one pass moves β by 0.6. (``training`` control on Ta-Feng used
    #: 0.1 with β in [0, 2].)
    ki: float = 60.0
    #: Lower bound of the controllers' output β, >= 0. With λ = 1 and ``sampling``
    #: coefficients, accuracy's share of a batch is β / (β + 1): 9% at 0.1.
    beta_min: float = 0.1
    #: Upper bound of β, >= ``beta_min``: accuracy's share is 91% at 10 (as above).
    beta_max: float = 10.0
    #: Batches whose mean losses are what ``relative`` targets are relative to, under
    #: ``training`` control.
    calibration_batches: int = 20
    #: N, the validation passes (signals, a controller step under ``validation`` control,
    #: then a mass update) per epoch of continued training, in the ``run`` job: one every
    #: ⌊batches_per_epoch / N⌋ batches and one at the epoch's end (one due within half
    #: that interval of the end is left to it), so N or N + 1 where an epoch holds many
    #: more batches than N, up to one a batch where it holds fewer than 2N. (A plugin job
    #: validates when it calls ``MoRec.validate``.)
    updates_per_epoch: int = 16
    #: Validation users a pass measures (ranking metrics and group losses): a fixed
    #: sample, the same users at every pass and for the reference, drawn with the
    #: sampler's seed; 0: all of them. A pass ranks every item for each of its users, so
    #: where users × items is large a sample bounds what the passes cost. (The jobs of
    #: ``run`` and ``demo`` use training's ``validation_users``, which pretraining's
    #: validations measure too: it is no flag there, and an error in their ``[morec]``
    #: table.)
    validation_users: int = 0
    #: The share of the base's validation Hit@10 a pass needs to be selected: 0.97, the
    #: validity threshold, or more where validation and test are known to disagree.
    select_hit: float = 0.97
    #: Epochs of continued training (a fixed length, no early stopping).
    epochs: int = 2
    #: Learning rate of continued training (0: the base's, restored with its optimizer).
    continued_lr: float = 1e-4

    def __post_init__(self) -> None:
        _check_fields(self)
        _check(all(p >= 0 for p in self.preference)
               and (not self.preference or abs(sum(self.preference) - 1) < 1e-6),
               "preference", self.preference, "entries >= 0 that sum to 1")
        _check(self.coordinator not in ("pe-mtl", "epo") or all(p > 0 for p in self.preference),
               "preference", self.preference, f"entries > 0 under coordinator {self.coordinator}")
        _check(self.scale > 0, "scale", self.scale, "> 0")
        _check(self.coefficients == "loss" or self.control == "validation", "coefficients",
               self.coefficients, "loss under control = training")
        _check(all(isinstance(t, HoldTarget) for t in self.hold.values()), "hold", self.hold,
               "objective name -> HoldTarget")
        absolute = [name for name, target in self.hold.items() if target.value is not None]
        if self.control == "validation" and absolute:
            raise MorecError(
                f"config: hold.{absolute[0]}: an absolute value under validation control, "
                f"whose quantity is relative to the base's metric (1 at the base): give "
                f"{absolute[0]}.relative (e.g. 1.01 for 1% short of the base's)")
        _check(self.kp >= 0, "kp", self.kp, ">= 0")
        _check(self.ki >= 0, "ki", self.ki, ">= 0")
        _check(0 <= self.beta_min <= self.beta_max, "beta_min", self.beta_min,
               f"0 <= beta_min <= beta_max ({self.beta_max})")
        _check(self.calibration_batches >= 1, "calibration_batches", self.calibration_batches,
               ">= 1")
        _check(self.updates_per_epoch >= 1, "updates_per_epoch", self.updates_per_epoch, ">= 1")
        _check(self.validation_users >= 0, "validation_users", self.validation_users, ">= 0")
        _check(self.select_hit > 0, "select_hit", self.select_hit, "> 0")
        _check(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        _check(self.continued_lr >= 0, "continued_lr", self.continued_lr, ">= 0")


#: The config file's table of each dataclass, and the commands that read it, in the
#: order of the reference.
SECTIONS: dict[type, tuple[str, str]] = {
    SourceConfig: ("source", "prepare"),
    PrepareConfig: ("prepare", "prepare, synth"),
    TrainConfig: ("train", "train, run, demo"),
    SamplerConfig: ("sampler", "run, demo"),
    MoRecConfig: ("morec", "run, demo"),
}


def _check_fields(config: Any) -> None:
    """Gives each field its type (numbers as plain ``int`` or ``float``, numpy's too;
    sequences as tuples); MorecError naming the first field whose value is not of its
    type or not among its options."""
    given = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    for name, value in _typed(type(config), given).items():
        setattr(config, name, value)
    for field in dataclasses.fields(config):
        options = _options(type(config), field.name)
        if options:
            value = getattr(config, field.name)
            _check(value in options, field.name, value, " or ".join(options))


def _options(cls: type, name: str) -> tuple[str, ...]:
    """The words a ``Literal`` field takes (empty for any other field)."""
    kind = _hints(cls)[name]
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else ()


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """``cls``'s field annotations, evaluated once: every config checks its fields' types
    as it is made."""
    return typing.get_type_hints(cls)


def _check(ok: bool, field: str, value: Any, expected: str) -> None:
    if not ok:
        raise MorecError(f"config: {field} = {value!r} is out of range (expected {expected})")


def add_arguments(parser: argparse.ArgumentParser, cls: type,
                  exclude: tuple[str, ...] = (), defaults: Mapping[str, Any] | None = None,
                  ) -> None:
    """Adds one ``--flag`` per field of the dataclass ``cls`` (but ``exclude``), its help the
    field's doc and default (``defaults``' value, where the command sets its own); unset
    flags stay absent."""
    defaults = defaults or {}
    group = parser.add_argument_group(cls.__name__, _first_sentence(cls))
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        kind = _field_type(cls, field.name)
        flag = "--" + field.name.replace("_", "-")
        # argparse formats help with %: a literal one is %%.
        default = (_value_text(defaults[field.name]) if field.name in defaults
                   else _default_text(field))
        help = f"{_plain(docs[field.name])} (default: {default})".replace("%", "%%")
        if kind is bool:
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help)
        elif kind is tuple:
            group.add_argument(flag, dest=field.name, type=_comma_list,
                               default=argparse.SUPPRESS, metavar="A,B,...", help=help)
        elif kind is dict:
            group.add_argument(flag, dest=field.name, type=_dotted_keys,
                               default=argparse.SUPPRESS, metavar="K.F=V,...", help=help)
        elif _options(cls, field.name):  # checked by the dataclass: a one-line error
            group.add_argument(flag, dest=field.name, default=argparse.SUPPRESS,
                               metavar="{" + ",".join(_options(cls, field.name)) + "}",
                               help=help)
        else:
            group.add_argument(flag, dest=field.name, type=kind, default=argparse.SUPPRESS,
                               metavar=kind.__name__.upper(), help=help)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field of the dataclass ``cls`` -> its doc: the ``#:`` comment lines right above
    the field in the source, joined. The one source of the flags' help and of the
    configuration reference; a field without one is an error."""
    lines, _ = inspect.getsourcelines(cls)
    body = ast.parse(textwrap.dedent("".join(lines))).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        comment: list[str] = []
        row = node.lineno - 2  # the line above, 0-based
        while row >= 0 and lines[row].strip().startswith("#:"):
            comment.insert(0, lines[row].strip()[2:].strip())
            row -= 1
        docs[node.target.id] = " ".join(comment)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    if missing:
        raise TypeError(f"{cls.__name__}: field(s) {', '.join(missing)} have no #: doc")
    return docs


def reference() -> str:
    """The configuration reference in Markdown (``docs/configuration.md``): one table per
    dataclass of :data:`SECTIONS`, from the fields' types, defaults and docs."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from the `#:` comments in morec_rec/config.py by",
        "     python -c 'from morec_rec.config import reference; print(reference(), end=\"\")' \\",
        "       > docs/configuration.md",
        "     Edit the comments and regenerate; tests/test_config_docs.py checks it. -->",
        "",
        "Every setting is a field of a dataclass in `morec_rec/config.py`. A config file",
        "(`--config FILE`) is TOML with one table per dataclass; each field is also a flag",
        "(`history_length` becomes `--history-length`; a tuple is a comma list on the",
        "command line, an array in TOML). Flags override the file, the file overrides the",
        "defaults; `demo` has defaults of its own, and `run --base RUN` takes the base's",
        "model, embedding size, table optimizer and dropout (their `--help` shows them).",
        "Unknown keys and out-of-range values are errors that name the key.",
        "In a Python job the same dataclasses are built directly, e.g.",
        "`MoRecConfig(hold={\"accuracy\": HoldTarget(relative=1.02)})`.",
    ]
    for cls, (section, commands) in SECTIONS.items():
        docs = field_docs(cls)
        out += ["", f"## `[{section}]`: {cls.__name__}", "",
                f"{_markdown(inspect.cleandoc(cls.__doc__ or ''))}", "",
                f"Read by: {commands}.", "",
                "| field | type | default | what it does |", "|---|---|---|---|"]
        for field in dataclasses.fields(cls):
            default = _default_text(field, toml=True)
            doc = _markdown(docs[field.name]).replace("|", "\\|")
            kind = " \\| ".join(f'"{o}"' for o in _options(cls, field.name)) or field.type
            out.append(f"| `{field.name}` | `{kind}` | `{default}` | {doc} |")
    return "\n".join(out) + "\n"


def _default_text(field: dataclasses.Field[Any], toml: bool = False) -> str:
    """A field's default as a flag (``a,b``, ``'x'``, ``k.f=1``) or as TOML (``["a", "b"]``,
    ``"x"``, ``{ k = { f = 1 } }``) writes it."""
    return _value_text(field.default if field.default_factory is dataclasses.MISSING
                       else field.default_factory(), toml)


def _value_text(value: Any, toml: bool = False) -> str:
    """:func:`_default_text` of a value."""
    if isinstance(value, dict):
        entries = {key: {f: v for f, v in dataclasses.asdict(target).items() if v is not None}
                   for key, target in value.items()}
        if toml:
            return "{ " + ", ".join(
                f"{key} = {{ " + ", ".join(f"{f} = {v}" for f, v in fields.items()) + " }"
                for key, fields in entries.items()) + " }"
        return ",".join(f"{key}.{f}={v}" for key, fields in entries.items()
                        for f, v in fields.items()) or "(none)"
    if isinstance(value, tuple):
        if toml:
            return "[" + ", ".join(json.dumps(v) for v in value) + "]"
        return ",".join(map(str, value)) or "(empty)"
    return json.dumps(value) if toml and isinstance(value, str) else repr(value)


def _first_sentence(cls: type) -> str:
    """The first paragraph of a class docstring, as plain text."""
    return _plain(" ".join(inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].split()))


def _plain(text: str) -> str:
    """reStructuredText literals (````x````) as plain text, for the command-line help."""
    return re.sub(r"``(.+?)``", r"\1", text)


def _markdown(text: str) -> str:
    """reStructuredText literals (````x````) as Markdown code."""
    return re.sub(r"``(.+?)``", r"`\1`", text)


def build(cls: type[C], file_values: dict[str, Any], args: argparse.Namespace | None,
          source: str | None = None) -> C:
    """An instance of ``cls`` from a config-file table, overridden by the flags set in
    ``args``. ``source`` says where the table was read (a file and its table): an error
    that its values raise without the flags names it."""
    try:
        return _build(cls, file_values, args)
    except MorecError:
        if source is None:
            raise
        try:
            _build(cls, file_values, None)
        except MorecError as error:
            raise MorecError(f"{source}: {str(error).removeprefix('config: ')}") from None
        raise


def _build(cls: type[C], file_values: dict[str, Any], args: argparse.Namespace | None) -> C:
    """:func:`build` of values from wherever."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(file_values) - names)
    if unknown:
        owners = {key: [f"[{table}]" for other, (table, _) in SECTIONS.items()
                        if key in {f.name for f in dataclasses.fields(other)}]
                  for key in unknown}
        hint = "".join(f"; {key} is a key of {' or '.join(tables)}"
                       for key, tables in owners.items() if tables)
        raise MorecError(f"config: unknown key(s) {', '.join(unknown)} for "
                         f"{cls.__name__}{hint}")
    # The file's values are checked even where a flag overrides them.
    values = _typed(cls, file_values)
    if args is not None:
        values.update(_typed(cls, {k: v for k, v in vars(args).items() if k in names}))
    return cls(**values)


def _typed(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` of fields of ``cls``, each as its field's type; MorecError naming the
    first that is not of it."""
    typed = {}
    for name, value in values.items():
        kind = _field_type(cls, name)
        if kind is tuple and isinstance(value, (list, tuple)):  # TOML arrays, comma lists
            value = _tuple_of(cls, name, value)
        if kind is dict and isinstance(value, dict):  # TOML tables, dotted-key flags
            value = _dict_of(cls, name, value)
        if kind in (int, float) and isinstance(value, numbers.Real) \
                and not isinstance(value, bool) \
                and (kind is float or isinstance(value, numbers.Integral)):
            value = kind(value)
        if not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool):
            article = "an" if kind.__name__[0] in "aeiou" else "a"
            raise MorecError(f"config: {name} = {value!r} is not {article} {kind.__name__}")
        if kind is float and not math.isfinite(value):
            raise MorecError(f"config: {name} = {value!r} is not a finite number")
        typed[name] = value
    return typed


def load_file(path: Path | None, sections: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Reads a TOML config file into its tables; only ``sections`` are allowed."""
    if path is None:
        return {s: {} for s in sections}
    try:
        with open(path, "rb") as f:
            content = tomllib.load(f)
    except FileNotFoundError:
        raise MorecError(f"{path}: no such config file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MorecError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise MorecError(f"{path}: cannot read the config file ({e.strerror})") from None
    for key in sorted(set(content) - set(sections)):
        owner = next((table for cls, (table, _) in SECTIONS.items() if table in sections
                      and key in {f.name for f in dataclasses.fields(cls)}), None)
        where = f": it belongs in [{owner}]" if owner else f" (expected {', '.join(sections)})"
        raise MorecError(f"{path}: {key} is not a section{where}")
    for section in sections:
        if not isinstance(content.get(section, {}), dict):
            raise MorecError(f"{path}: {section} = {content[section]!r} is not a table: "
                             f"write [{section}] above its keys")
    return {s: content.get(s, {}) for s in sections}


def _field_type(cls: type, name: str) -> type:
    """The type a field's values must have: ``X | None`` → X, ``tuple[str, ...]`` → tuple."""
    kind = _hints(cls)[name]
    if typing.get_origin(kind) is Literal:
        return str
    if isinstance(kind, types.UnionType):
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    return typing.get_origin(kind) or kind


def _tuple_of(cls: type, name: str, value: list | tuple) -> tuple:
    """``value`` as a tuple of the field's element type (``tuple[float, ...]`` -> floats)."""
    (element, _) = typing.get_args(_hints(cls)[name])
    try:
        return tuple(element(v) for v in value)
    except (TypeError, ValueError):
        raise MorecError(f"config: {name} = {value!r} is not a list of "
                         f"{element.__name__}") from None


def _dict_of(cls: type, name: str, value: dict) -> dict:
    """``value``'s tables as the field's value dataclass (``{"a": {"relative": 1}}`` ->
    ``{"a": HoldTarget(relative=1.0)}``)."""
    (_, element) = typing.get_args(_hints(cls)[name])
    fields = {f.name for f in dataclasses.fields(element)}
    out = {}
    for key, entry in value.items():
        if isinstance(entry, element):
            out[key] = entry
            continue
        if not isinstance(entry, dict) or not entry.keys() <= fields:
            raise MorecError(f"config: {name}.{key} = {entry!r} is not a table of "
                             f"{', '.join(sorted(fields))}")
        given = {k: v for k, v in entry.items() if v is not None}  # a record's JSON nulls
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                   for v in given.values()):
            raise MorecError(f"config: {name}.{key} = {entry!r} needs numbers")
        try:
            out[key] = element(**{k: float(v) for k, v in given.items()})
        except MorecError as error:
            raise MorecError(f"config: {name}.{key}: {error}") from None
    return out


def _dotted_keys(text: str) -> dict[str, Any]:
    """``a.f=1,b.g=2`` -> ``{"a": {"f": 1}, "b": {"g": 2}}``: TOML dotted keys, comma-joined."""
    try:
        return tomllib.loads("\n".join(text.split(",")))
    except tomllib.TOMLDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY.FIELD=NUMBER,... ({error})")


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())
