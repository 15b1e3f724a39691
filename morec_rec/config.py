"""Configuration: dataclasses, loaded from a TOML file, overridden by command-line flags.

Every tunable of the project is a field of one of the dataclasses below. A config file is
TOML with one table per dataclass (``[prepare]``, ``[source]``, ...); each field is also a
flag (``history_length`` → ``--history-length``). Unknown keys and out-of-range values are
errors that name the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from morec_rec.errors import MorecError

C = TypeVar("C")

#: FBGEMM optimizer names (``EmbOptimType`` values) that ``TrainConfig.table_optimizer`` takes.
_TABLE_OPTIMIZERS = ("adam", "exact_sgd", "exact_adagrad", "exact_row_wise_adagrad")


@dataclasses.dataclass
class SourceConfig:
    """How a source reader finds its fields (used by the readers that need each field)."""

    #: Interaction columns of the ``generic`` and ``morec`` sources.
    user_column: str = "user"
    item_column: str = "item"
    time_column: str = "timestamp"
    #: Rating column; empty means implicit feedback (no rating filter).
    rating_column: str = ""
    #: Item-table columns of the ``generic`` source.
    price_column: str = "price"
    category_column: str = "category"
    #: CSV field delimiter of the ``generic`` and ``morec`` sources.
    delimiter: str = ","
    #: ``tafeng``: digits of PRODUCT_SUBCLASS kept as the category (2 → 26 groups).
    category_prefix: int = 2

    def __post_init__(self) -> None:
        _check(len(self.delimiter) == 1, "delimiter", self.delimiter, "one character")
        _check(1 <= self.category_prefix <= 6, "category_prefix", self.category_prefix, "1..6")


@dataclasses.dataclass
class PrepareConfig:
    """Preparation of a raw source into the on-disk format (see README, "Data format")."""

    #: Interactions rated below this are dropped (only where the source has ratings).
    min_rating: float = 3.0
    #: Iterative k-core: every user and item keeps at least this many interactions.
    k_core: int = 5
    #: Items kept in the ``history`` column (the most recent last).
    history_length: int = 50
    #: Popularity groups, cut over items sorted by training count; at most the number of
    #: items left after filtering (more is an error: a group would have no item).
    popularity_groups: int = 10
    #: ``equal_items``: each group holds the same number of items; ``equal_interactions``:
    #: each holds about the same number of training interactions.
    popularity_rule: str = "equal_items"
    #: Smallest categories fold into "other" until every fairness group holds at least
    #: this share of the held-out items of the validation and of the test split.
    min_group_share: float = 0.02
    #: Items without a price or category: ``impute`` (price = category median, category
    #: "unknown") or ``error``.
    missing: str = "impute"
    #: Rows per Parquet row group and per ``train/part-*.parquet`` shard.
    row_group_size: int = 16_384
    rows_per_shard: int = 1_048_576
    #: Seeds the tie-break of same-time interactions and the order of training rows.
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.k_core >= 3, "k_core", self.k_core, ">= 3: leave-one-out needs 3 per user")
        _check(self.history_length >= 0, "history_length", self.history_length, ">= 0")
        _check(self.popularity_groups >= 1, "popularity_groups", self.popularity_groups, ">= 1")
        _check(
            self.popularity_rule in ("equal_items", "equal_interactions"),
            "popularity_rule",
            self.popularity_rule,
            "equal_items or equal_interactions",
        )
        _check(0 <= self.min_group_share < 0.5, "min_group_share", self.min_group_share, "[0, 0.5)")
        _check(self.missing in ("impute", "error"), "missing", self.missing, "impute or error")
        _check(self.row_group_size >= 1, "row_group_size", self.row_group_size, ">= 1")
        _check(
            self.rows_per_shard >= self.row_group_size,
            "rows_per_shard",
            self.rows_per_shard,
            ">= row_group_size",
        )


@dataclasses.dataclass
class SamplerConfig:
    """The weighted streaming sampler and the objectives' sampling distributions."""

    #: Objectives, one sub-batch each, in this order (segment id = position).
    objectives: tuple[str, ...] = ("accuracy", "revenue", "fairness", "alignment")
    #: A batch holds ``sub_batch_size * len(objectives)`` rows, split between the
    #: objectives by their shares (equal unless published: MoRec's ``sampling``
    #: coefficients).
    sub_batch_size: int = 256
    #: Batches per window: the rows that the sampler holds and draws from at a time.
    window_batches: int = 64
    #: Group counts of a sub-batch: ``multinomial`` draws, or ``exact`` (largest-remainder
    #: rounding of mass × sub-batch size, as in FairBatch).
    draw: str = "multinomial"
    #: Mass update of the adaptive objectives: step α, floor, ``additive`` or
    #: ``multiplicative``. α is per validation pass: SPEC's 0.1 at about 4 passes an epoch
    #: is 0.025 at MoRec's default 16.
    step: float = 0.025
    floor: float = 1e-3
    update_rule: str = "additive"
    #: Fairness's most miserable group: the largest validation ``loss`` (SPEC) or the
    #: lowest validation ``hit`` (Hit@K, the group that min-Hit@K measures).
    fairness_signal: str = "loss"
    seed: int = 0

    def __post_init__(self) -> None:
        _check(len(self.objectives) >= 1, "objectives", self.objectives, "at least one")
        _check(self.sub_batch_size >= 1, "sub_batch_size", self.sub_batch_size, ">= 1")
        _check(self.window_batches >= 1, "window_batches", self.window_batches, ">= 1")
        _check(self.draw in ("multinomial", "exact"), "draw", self.draw,
               "multinomial or exact")
        _check(self.step > 0, "step", self.step, "> 0")
        _check(0 <= self.floor < 1, "floor", self.floor, "[0, 1)")
        _check(self.update_rule in ("additive", "multiplicative"), "update_rule",
               self.update_rule, "additive or multiplicative")
        _check(self.fairness_signal in ("loss", "hit"), "fairness_signal",
               self.fairness_signal, "loss or hit")


@dataclasses.dataclass
class TrainConfig:
    """Training of a backbone (SPEC "Training protocol") and its early stopping."""

    #: Backbone: ``mf`` (MF-BPR, 10 negatives) or ``sasrec`` (SASRec, 3 negatives).
    model: str = "mf"
    embedding_dim: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    #: The tables' optimizer, as FBGEMM names it (``adam``, ``exact_adagrad``,
    #: ``exact_row_wise_adagrad``, ``exact_sgd``, ...). FBGEMM's CPU kernels have no Adam:
    #: on CPU, ``adam`` keeps the tables unsharded (see ``pipeline/sharding.py``).
    table_optimizer: str = "adam"
    batch_size: int = 1024
    #: Negatives are drawn ∝ training count^beta (0: uniform), never the positive.
    negative_beta: float = 0.75
    #: SASRec's dropout rate (the original SASRec used 0.2 on dense data, 0.5 on sparse).
    dropout: float = 0.2
    max_epochs: int = 50
    #: Validate every this many steps (0: at the end of each epoch only).
    eval_every: int = 0
    #: Stop after this many validations without a better validation Hit@10.
    patience: int = 3
    #: DataLoader worker processes per rank (0: load in the training process).
    num_workers: int = 1
    #: Users scored at a time in full-ranking evaluation.
    eval_chunk_users: int = 1024
    #: Save the ``last`` checkpoint every this many steps, as well as at every epoch's
    #: end (0: at epochs' ends only). A resumed run goes on from the step saved.
    checkpoint_every: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.model in ("mf", "sasrec"), "model", self.model, "mf or sasrec")
        _check(self.embedding_dim >= 1, "embedding_dim", self.embedding_dim, ">= 1")
        _check(self.lr > 0, "lr", self.lr, "> 0")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(self.table_optimizer in _TABLE_OPTIMIZERS, "table_optimizer",
               self.table_optimizer, " or ".join(_TABLE_OPTIMIZERS))
        _check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _check(self.negative_beta >= 0, "negative_beta", self.negative_beta, ">= 0")
        _check(0 <= self.dropout < 1, "dropout", self.dropout, "0 <= dropout < 1")
        _check(self.max_epochs >= 1, "max_epochs", self.max_epochs, ">= 1")
        _check(self.eval_every >= 0, "eval_every", self.eval_every, ">= 0")
        _check(self.patience >= 1, "patience", self.patience, ">= 1")
        _check(self.num_workers >= 0, "num_workers", self.num_workers, ">= 0")
        _check(self.eval_chunk_users >= 1, "eval_chunk_users", self.eval_chunk_users, ">= 1")
        _check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, ">= 0")


#: What MoRec's controllers may hold (``MoRecConfig.control``).
CONTROLS = ("training", "validation")
#: Where the coefficients q act (``MoRecConfig.coefficients``).
COEFFICIENTS = ("sampling", "loss")


@dataclasses.dataclass
class MoRecConfig:
    """MoRec's continued training: the objective coordinator (SPEC "Objective coordinator").

    The coefficients of the sampler's objectives are ``q_o = c_o · w_o``, with ``w = 1``
    for accuracy and ``scale · p_o`` for the others; ``c_o`` is the output β of the PI
    controller holding objective o, or 1 where none does. They weigh the objectives'
    losses or their shares of each batch (``coefficients``).
    """

    #: p: preference over the objectives other than accuracy, in the sampler's order; sums
    #: to 1 (empty when accuracy is the only objective).
    preference: tuple[float, ...] = (0.4, 0.3, 0.3)
    #: λ: scale of the non-accuracy terms. The paper's 0.2 (with β >= 0.6) leaves the
    #: controller no authority: see README, "MoRec on Ta-Feng".
    scale: float = 1.0
    #: What the controllers hold: ``validation``, each held objective's validation metric
    #: relative to the base's (see :mod:`morec_rec.control.measures`), stepped at each
    #: validation pass; or ``training``, its mean training loss, stepped every batch (the
    #: paper's). On Ta-Feng only validation control had authority over what decides
    #: validity, on MF and SASRec (README, "Which quantity to control").
    control: str = "validation"
    #: Where the coefficients q act: ``loss``, as the weights of ``Σ_o q_o · ℓ_o`` over
    #: equal sub-batches (the paper's); or ``sampling``, as each objective's share of the
    #: batch's rows (``q / Σ q``), the loss being the batch's plain mean. Both have the same
    #: expected gradient up to scale; under Adam only the shares have authority over rows
    #: that the other objectives alone touch (README, "Where the coefficients act").
    #: ``sampling`` needs ``validation`` control: the loaders draw batches ahead, so the
    #: shares follow the controllers at validation passes, not at every step.
    coefficients: str = "sampling"
    #: Objectives held by a PI controller, each ``name=target``. The target is a value of
    #: the controlled quantity, ``auto`` (its value at the base model: under ``training``
    #: control, the base's mean loss on that objective's sub-batches, measured before
    #: continued training; under ``validation`` control, 1) or ``auto*F`` (F times it).
    hold: tuple[str, ...] = ("accuracy=auto*1.01",)
    #: PI gains and the range of its output β (the same for every held objective); ki is
    #: per controller step (a batch or a validation pass, by ``control``). The defaults are
    #: for ``validation`` control with ``sampling`` coefficients: with λ = 1, accuracy's
    #: share of a batch is β / (β + 1), from 9% at β_min = 0.1 to 91% at β_max = 10; a 1%
    #: shortfall held for one pass moves β by 0.6. (``training`` control on Ta-Feng used
    #: ki 0.1, β in [0, 2].)
    kp: float = 0.01
    ki: float = 60.0
    beta_min: float = 0.1
    beta_max: float = 10.0
    #: Batches whose mean losses give the ``auto`` targets.
    calibration_batches: int = 20
    #: Validation passes (signals, a controller step under ``validation`` control, then a
    #: mass update) per epoch of continued training.
    updates_per_epoch: int = 16
    #: The share of the base's validation Hit@10 a pass needs to be selected: SPEC's
    #: validity, 0.97, or more where validation and test are known to disagree.
    select_hit: float = 0.97
    #: Length of continued training.
    epochs: int = 2
    #: Learning rate of continued training (0: the base's, restored with its optimizer).
    continued_lr: float = 1e-4

    def __post_init__(self) -> None:
        _check(all(p >= 0 for p in self.preference)
               and (not self.preference or abs(sum(self.preference) - 1) < 1e-6),
               "preference", self.preference, "entries >= 0 that sum to 1")
        _check(self.scale > 0, "scale", self.scale, "> 0")
        _check(self.control in CONTROLS, "control", self.control, " or ".join(CONTROLS))
        _check(self.coefficients in COEFFICIENTS, "coefficients", self.coefficients,
               " or ".join(COEFFICIENTS))
        _check(self.coefficients == "loss" or self.control == "validation", "coefficients",
               self.coefficients, "loss under control = training")
        for item in self.hold:
            _check(parse_hold(item) is not None, "hold", item,
                   "name=auto, name=auto*F or name=VALUE with F, VALUE > 0")
        _check(self.kp >= 0, "kp", self.kp, ">= 0")
        _check(self.ki >= 0, "ki", self.ki, ">= 0")
        _check(0 <= self.beta_min <= self.beta_max, "beta_min", self.beta_min,
               f"0 <= beta_min <= beta_max ({self.beta_max})")
        _check(self.calibration_batches >= 1, "calibration_batches", self.calibration_batches,
               ">= 1")
        _check(self.updates_per_epoch >= 1, "updates_per_epoch", self.updates_per_epoch, ">= 1")
        _check(self.select_hit > 0, "select_hit", self.select_hit, "> 0")
        _check(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        _check(self.continued_lr >= 0, "continued_lr", self.continued_lr, ">= 0")


def parse_hold(item: str) -> tuple[str, float | None, float] | None:
    """``name=target`` -> (name, value, factor): value None means ``auto`` times factor.

    None when malformed (no ``=``, a target that is not ``auto``, ``auto*F`` or a number,
    a non-positive number).
    """
    name, sep, target = (part.strip() for part in item.partition("="))
    if not (name and sep):
        return None
    try:
        if target == "auto":
            return name, None, 1.0
        if target.startswith("auto*"):
            factor = float(target[len("auto*"):])
            return (name, None, factor) if factor > 0 else None
        value = float(target)
        return (name, value, 1.0) if value > 0 else None
    except ValueError:
        return None


def _check(ok: bool, field: str, value: Any, expected: str) -> None:
    if not ok:
        raise MorecError(f"config: {field} = {value!r} is out of range (expected {expected})")


def add_arguments(parser: argparse.ArgumentParser, cls: type,
                  exclude: tuple[str, ...] = ()) -> None:
    """Adds one ``--flag`` per field of the dataclass ``cls`` (but ``exclude``); unset
    flags stay absent."""
    group = parser.add_argument_group(cls.__name__)
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        kind = _field_type(cls, field.name)
        flag = "--" + field.name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS)
        elif kind is tuple:
            group.add_argument(flag, dest=field.name, type=_comma_list,
                               default=argparse.SUPPRESS, metavar="A,B,...",
                               help=f"default: {','.join(map(str, field.default))}")
        else:
            group.add_argument(flag, dest=field.name, type=kind, default=argparse.SUPPRESS,
                               metavar=kind.__name__.upper(),
                               help=f"default: {field.default!r}")


def build(cls: type[C], file_values: dict[str, Any], args: argparse.Namespace | None) -> C:
    """An instance of ``cls`` from a config-file table, overridden by the flags set in ``args``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(file_values) - names)
    if unknown:
        raise MorecError(f"config: unknown key(s) {', '.join(unknown)} for {cls.__name__}")
    values = dict(file_values)
    if args is not None:
        values.update({k: v for k, v in vars(args).items() if k in names})
    for name, value in values.items():
        kind = _field_type(cls, name)
        if kind is tuple and isinstance(value, (list, tuple)):  # TOML arrays, comma lists
            value = values[name] = _tuple_of(cls, name, value)
        if not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
            raise MorecError(f"config: {name} = {value!r} is not a {kind.__name__}")
        if kind is float:
            values[name] = float(value)
    return cls(**values)


def load_file(path: Path | None, sections: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Reads a TOML config file into its tables; only ``sections`` are allowed."""
    if path is None:
        return {s: {} for s in sections}
    try:
        with open(path, "rb") as f:
            content = tomllib.load(f)
    except FileNotFoundError:
        raise MorecError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise MorecError(f"{path}: not valid TOML ({e})") from None
    unknown = sorted(set(content) - set(sections))
    if unknown:
        raise MorecError(f"{path}: unknown section(s) {', '.join(unknown)}")
    return {s: content.get(s, {}) for s in sections}


def _field_type(cls: type, name: str) -> type:
    """The type a field's values must have: ``X | None`` → X, ``tuple[str, ...]`` → tuple."""
    kind = typing.get_type_hints(cls)[name]
    if isinstance(kind, types.UnionType):
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    return typing.get_origin(kind) or kind


def _tuple_of(cls: type, name: str, value: list | tuple) -> tuple:
    """``value`` as a tuple of the field's element type (``tuple[float, ...]`` -> floats)."""
    (element, _) = typing.get_args(typing.get_type_hints(cls)[name])
    try:
        return tuple(element(v) for v in value)
    except (TypeError, ValueError):
        raise MorecError(f"config: {name} = {value!r} is not a list of "
                         f"{element.__name__}") from None


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())
