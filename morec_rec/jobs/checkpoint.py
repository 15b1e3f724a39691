"""Checkpoints with ``torch.distributed.checkpoint``: sharded tables, optimizer state, metadata.

A checkpoint is a directory: DCP's files (each rank writes its own shards, rank 0 the
``.metadata``) and ``meta.json`` (what model it holds, the training progress, anything the
caller adds). A save writes ``<name>.partial``; once every rank has finished, rank 0
writes its ``meta.json`` (atomically: this commits the save), renames ``<name>`` to
``<name>.old``, ``<name>.partial`` to ``<name>``, and removes ``<name>.old``. A kill at any
point thus leaves a complete checkpoint: readers take the newest (:func:`resolve`), and
:func:`recover` (which every save runs first) moves it back to ``<name>``. DCP reshards on
load, so a checkpoint written by N ranks loads on any number of ranks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from morec_rec.errors import MorecError

META = "meta.json"
#: The file in which DCP's coordinator records what the shards hold.
DCP_METADATA = ".metadata"


def save(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         meta: Mapping[str, Any]) -> None:
    """Saves ``model`` and ``optimizer`` (collective: every rank calls it) with ``meta``."""
    path = Path(path)
    partial = _partial(path)
    if dist.get_rank() == 0:
        recover(path)  # leaves no ``partial``
    dist.barrier()
    try:
        dcp.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                 checkpoint_id=partial)
    except CheckpointException as error:
        # DCP wraps what a rank raised; Ctrl-C and a full disk are the user's to see as such.
        failure = next(iter(error.failures.values()))[0] if error.failures else None
        if isinstance(failure, (KeyboardInterrupt, OSError)):
            raise failure from None
        if isinstance(failure, RuntimeError) and "unexpected pos" in str(failure):
            # torch's file writer on a short write
            raise MorecError(f"{partial}: the checkpoint could not be written (a full "
                             f"disk?): {_cause(error)}") from None
        raise
    if dist.get_rank() == 0:
        written = partial / (META + ".tmp")
        written.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(written, partial / META)
        _install(path)
    dist.barrier()


def resolve(path: Path) -> Path | None:
    """The checkpoint that stands for ``path``, or None if there is none.

    That is the newest complete one: ``path.partial`` once its save is committed (its
    ``meta.json`` written), else ``path``, else ``path.old`` if complete (a save killed
    between its renames leaves no ``path``). Only reads the file system.
    """
    path = Path(path)
    if _complete(_partial(path)):
        return _partial(path)
    if path.exists():
        return path
    return _old(path) if _complete(_old(path)) else None


def recover(path: Path) -> None:
    """Completes a save of ``path`` that was interrupted (killed): the checkpoint that
    :func:`resolve` finds moves to ``path``; what else the save left (an uncommitted
    ``path.partial``, a ``path.old`` beside ``path``) goes. Call it on one process (rank 0)
    while no save of ``path`` runs."""
    path = Path(path)
    found = resolve(path)
    if found == _partial(path):
        _install(path)
    elif found == _old(path):
        found.rename(path)
    shutil.rmtree(_partial(path), ignore_errors=True)
    if path.exists():
        shutil.rmtree(_old(path), ignore_errors=True)


def read_meta(path: Path, required: Sequence[str] = ()) -> dict[str, Any]:
    """The metadata of the checkpoint at ``path`` (see :func:`resolve`); MorecError if
    there is none, it is unreadable, or one of the ``required`` keys is missing or not a
    JSON object."""
    found = resolve(path)
    if found is None or not (found / META).is_file():
        raise MorecError(f"{path}: not a checkpoint (no {META})")
    file = found / META
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MorecError(f"{file}: corrupt checkpoint metadata ({e})") from None
    if not isinstance(meta, dict):
        raise MorecError(f"{file}: corrupt checkpoint metadata (not a JSON object)")
    for key in required:
        if not isinstance(meta.get(key), dict):
            found_as = "missing" if key not in meta else f"{meta[key]!r}, not a JSON object"
            raise MorecError(f"{file}: corrupt checkpoint metadata ({key!r} {found_as})")
    return meta


#: Model identity fields that checkpoints saved before they were recorded lack: such a
#: checkpoint is not compared on them (on any other field, a missing one differs).
RECORDED_LATER = frozenset({"history_length"})


def mismatches(meta: Mapping[str, Any], expect: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The fields of ``expect`` that a checkpoint's ``meta`` records otherwise, as (recorded,
    expected), None where it records none (see :data:`RECORDED_LATER`)."""
    return {k: (meta.get(k), v) for k, v in expect.items()
            if meta.get(k) != v and (k in meta or k not in RECORDED_LATER)}


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         expect: Mapping[str, Any], required: Sequence[str] = ()) -> dict[str, Any]:
    """Loads a checkpoint into ``model`` (and ``optimizer``); returns its metadata.

    ``path`` is read as :func:`resolve` says. ``expect`` holds metadata fields that must
    match (the model's name and sizes), ``required`` those it must hold (see
    :func:`read_meta`): a checkpoint of another model is refused before anything is
    loaded. A missing, truncated or corrupt checkpoint file is a :class:`MorecError`
    naming the checkpoint; so is another rank's failure during the load (its message
    says so: the checkpoint may be fine).
    """
    meta = read_meta(path, required)
    wrong = mismatches(meta, expect)
    if wrong:
        found = ", ".join(f"{k} {got!r} (expected {want!r})" for k, (got, want) in wrong.items())
        raise MorecError(f"{path}: checkpoint of another model: {found}")
    source = resolve(path) or Path(path)
    _check_dcp_metadata(source)
    state: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        _materialise_state(optimizer)
        state["optimizer"] = optimizer.state_dict()
    try:
        dcp.load(state, checkpoint_id=source)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        if _communication(e):
            raise MorecError(f"{source}: a rank failed while the checkpoint was loading "
                             f"({_cause(e)}); the checkpoint may be fine") from None
        raise MorecError(f"{source}: corrupt checkpoint ({_cause(e)})") from None
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return meta


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _old(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def _complete(path: Path) -> bool:
    """Whether ``path`` holds a committed save (its ``meta.json``, written last)."""
    return (path / META).is_file() and (path / DCP_METADATA).is_file()


def _install(path: Path) -> None:
    """Moves the committed ``path.partial`` to ``path`` (rank 0); ``path.old`` holds the
    previous checkpoint in between. Every step leaves :func:`resolve` a complete one."""
    old = _old(path)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)  # left by a kill in the removal below
        path.rename(old)
    _partial(path).rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _check_dcp_metadata(path: Path) -> None:
    """Raises :class:`MorecError` unless DCP's metadata of ``path`` can be read (read here
    first, since DCP logs each failed attempt with a traceback before raising)."""
    if not (path / DCP_METADATA).is_file():
        raise MorecError(f"{path}: incomplete checkpoint (no {DCP_METADATA} of "
                         "torch.distributed.checkpoint)")
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # whatever unpickling a damaged file raises
        raise MorecError(f"{path}: corrupt checkpoint ({DCP_METADATA}: {_cause(e)})") from None
    if not isinstance(metadata, Metadata):
        raise MorecError(f"{path}: corrupt checkpoint ({DCP_METADATA} holds no DCP metadata)")


#: Words of the messages of the process group's failures that torch raises as plain
#: RuntimeErrors (gloo's, a peer's closed connection).
_COMMUNICATION = re.compile(r"gloo|nccl|connection|peer|socket|timed out|timeout", re.I)


def _communication(error: BaseException) -> bool:
    """Whether ``error`` (or, for DCP's CheckpointException, a rank's error in it) is a
    failure of the process group rather than of the checkpoint's files."""
    if isinstance(error, CheckpointException):
        return any(_communication(failure) for failure, _ in error.failures.values())
    if isinstance(error, dist.DistError):
        return True
    return type(error) is RuntimeError and bool(_COMMUNICATION.search(str(error)))


def _cause(error: BaseException) -> str:
    """The first line of the underlying error (a rank's, for DCP's CheckpointException)."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _materialise_state(optimizer: torch.optim.Optimizer) -> None:
    """Creates the state a fresh optimizer keeps lazily (torch's Adam makes its moments at
    its first step), so that DCP has tensors to load into: without them a checkpoint's
    optimizer state is silently skipped. ``init_state`` is a step with zero gradients, on
    each part whose state is still empty (the fused table optimizers keep theirs from
    the start); the model is loaded after it."""
    parts = optimizer.optimizers if isinstance(optimizer, CombinedOptimizer) else [("", optimizer)]
    for _, part in parts:
        if isinstance(part, KeyedOptimizer) and part.params and not part.state:
            part.init_state()
