"""The training loop of both stages: epochs of pipeline steps, with step records,
validations and checkpoints at their intervals.

A :class:`Stage` (pretraining, MoRec continued training) says where an epoch starts, what
its step records hold, when it validates and when it stops; :func:`fit` does the rest, the
same way for both. Step records fall at fixed steps (every :data:`LOG_EVERY` and at every
checkpoint), and the model's own randomness (dropout) at a step is drawn from a generator
seeded by (seed, rank, step), so a run resumed from a checkpoint trains and logs what an
uninterrupted one does, with no generator state saved.
"""

from __future__ import annotations

import dataclasses
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Self

import numpy as np
import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from morec_rec.errors import MorecError
from morec_rec.jobs import distributed
from morec_rec.jobs.run import Run

#: Steps between two "step" records of the log.
LOG_EVERY = 10


@dataclasses.dataclass
class Progress:
    """Where training stands; saved in every checkpoint's metadata (with a stage's own
    fields, in a subclass)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # batches trained, over all epochs
    best_step: int = -1  # the step of the ``best`` checkpoint (-1: none yet)

    @classmethod
    def restore(cls, record: Any, checkpoint: Path) -> Self:
        """The progress a checkpoint's metadata saved (``dataclasses.asdict``); MorecError
        naming ``checkpoint`` when ``record`` is not every field of ``cls`` with a value of
        its type."""
        hints = typing.get_type_hints(cls)
        if not isinstance(record, dict) or set(record) != set(hints):
            found = sorted(record) if isinstance(record, dict) else record
            problem = f"fields {found!r}, expected {sorted(hints)}"
        else:
            problem = next((f"{name} = {value!r}" for name, value in record.items()
                            if not _holds(value, hints[name])), None)
        if problem:
            raise MorecError(f"{checkpoint}: corrupt checkpoint metadata (progress: {problem})")
        return cls(**record)


def _holds(value: Any, hint: Any) -> bool:
    """Whether the JSON ``value`` is of the annotation ``hint`` (numbers, containers,
    unions of them)."""
    if isinstance(hint, types.UnionType):
        return any(_holds(value, option) for option in typing.get_args(hint))
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) \
            and not isinstance(value, bool)
    return isinstance(value, typing.get_origin(hint) or hint)


class Stage(Protocol):
    """What :func:`fit` asks of a training stage."""

    progress: Progress
    batches_per_epoch: int
    #: Training rows per step over all ranks.
    samples_per_step: int
    #: The progress bar's label.
    name: str

    def finished(self) -> bool:
        """Whether training is over (checked before each epoch)."""

    def epoch_batches(self) -> Iterator[Any]:
        """The batches of epoch ``progress.epoch`` from step ``progress.step`` on."""

    def step(self, output: Any) -> dict[str, str]:
        """Notes a step's model output without reading it on the host; returns the
        progress bar's fields."""

    def record(self) -> dict[str, Any]:
        """The fields of a step record over the steps noted since the last one (a
        collective where the stage reduces over ranks)."""

    def validation_due(self, done: int) -> bool:
        """Whether to validate after ``done`` steps of the current epoch."""

    def validate(self, model: torch.nn.Module) -> None:
        """A validation pass over ``model``, the pipeline detached (and what the stage
        does with the pass)."""

    def end_epoch(self) -> None:
        """After an epoch's last validation, once ``progress.epoch`` counts it."""

    def save(self) -> None:
        """The ``last`` checkpoint."""


def fit(pipeline: TrainPipelineSparseDist, stage: Stage, run: Run,
        env: distributed.Environment, checkpoint_every: int, seed: int) -> None:
    """Trains ``stage`` until it is finished: each epoch's steps through ``pipeline``, a
    step record every :data:`LOG_EVERY` steps and at every checkpoint (``last``, every
    ``checkpoint_every`` steps, 0 for none, and at every epoch's end), a validation where
    the stage says so and at every epoch's end unless its last step had one.

    Before step ``s`` (0-based, over all epochs) the default generator of ``env.device``,
    which the model's random layers draw from, is seeded from (``seed``, rank, ``s``):
    a step's dropout is the same however the run got there, and differs across ranks.
    """
    progress = stage.progress
    generator = _default_generator(env.device)
    rank_seed = int(np.random.SeedSequence([seed, env.rank]).generate_state(1, np.uint32)[0])
    while not stage.finished():
        batches = stage.epoch_batches()
        done = progress.step - progress.epoch * stage.batches_per_epoch
        records = _StepRecords(run, stage)
        # Rank 0 shows a bar when writing to a terminal (tqdm's disable=None); others never.
        bar = tqdm(total=stage.batches_per_epoch, initial=done,
                   desc=f"{stage.name} {progress.epoch}", unit="batch", leave=False,
                   disable=None if env.is_main else True)
        validated = False
        while True:
            # TrainPipelineSparseDist runs the forward of step ``progress.step`` in this call.
            generator.manual_seed(rank_seed * 2**32 + progress.step)
            try:
                output = pipeline.progress(batches)
            except StopIteration:
                break
            progress.step += 1
            done += 1
            fields = stage.step(output)
            records.note()
            bar.set_postfix(samples_per_s=f"{records.rate:,.0f}", **fields)
            bar.update()
            checkpoint = checkpoint_every and progress.step % checkpoint_every == 0
            if progress.step % LOG_EVERY == 0 or checkpoint:
                records.log()
            validated = stage.validation_due(done)
            if validated:
                validate_detached(pipeline, stage.validate)
            if checkpoint:
                stage.save()
        bar.close()
        records.log()
        if not validated:
            validate_detached(pipeline, stage.validate)
        progress.epoch += 1
        stage.end_epoch()
        stage.save()


def validate_detached(pipeline: TrainPipelineSparseDist,
                      validate: Callable[[torch.nn.Module], Any]) -> None:
    """``validate`` of the pipeline's own model between two of its steps.

    The model is re-attached without restarting the input distribution of the batch the
    pipeline holds (``sparse_dist=False``, TorchRec's way for a model used outside the
    loop): the restart that ``progress`` would make on its own fails in the all-to-all
    of a sharded ``EmbeddingCollection``.
    """
    model = pipeline.detach()
    validate(model)
    pipeline.attach(model, sparse_dist=False)


def _default_generator(device: torch.device) -> torch.Generator:
    """The generator that random operations on ``device`` draw from by default."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index]
    return torch.default_generator


class _StepRecords:
    """The "step" records of one epoch: each covers the steps since the one before."""

    def __init__(self, run: Run, stage: Stage) -> None:
        self.run, self.stage = run, stage
        self.started = time.perf_counter()
        self.steps = 0  # this epoch's, so far
        self.logged = 0

    def note(self) -> None:
        """Counts a step."""
        self.steps += 1

    @property
    def rate(self) -> float:
        """Samples per second over this epoch's steps so far."""
        elapsed = time.perf_counter() - self.started
        return self.steps * self.stage.samples_per_step / elapsed if elapsed > 0 else 0.0

    def log(self) -> None:
        """Logs the record of the steps since the last one, if any."""
        if self.steps == self.logged:
            return
        progress = self.stage.progress
        self.run.log({"kind": "step", "epoch": progress.epoch, "step": progress.step,
                      **self.stage.record(), "samples_per_s": self.rate})
        self.logged = self.steps
