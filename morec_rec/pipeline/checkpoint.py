"""Checkpoints with ``torch.distributed.checkpoint``: sharded tables, optimizer state, metadata.

A checkpoint is a directory: DCP's files (each rank writes its own shards) and
``meta.json`` (what model it holds, the training progress, anything the caller adds). It
is written to ``<name>.partial`` and renamed into place by rank 0 once every rank has
finished, so an interrupted save never replaces a good checkpoint. DCP reshards on load,
so a checkpoint written by N ranks loads on any number of ranks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from morec_rec.errors import MorecError

META = "meta.json"


def save(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         meta: Mapping[str, Any]) -> None:
    """Saves ``model`` and ``optimizer`` (collective: every rank calls it) with ``meta``."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    dcp.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
             checkpoint_id=partial)
    if dist.get_rank() == 0:
        (partial / META).write_text(json.dumps(meta, indent=2) + "\n")
        old = path.with_name(path.name + ".old")
        if path.exists():
            path.rename(old)
        partial.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def read_meta(path: Path) -> dict[str, Any]:
    """The metadata of the checkpoint at ``path``; MorecError if there is none."""
    file = Path(path) / META
    if not file.is_file():
        raise MorecError(f"{path}: not a checkpoint (no {META})")
    return json.loads(file.read_text())


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         expect: Mapping[str, Any]) -> dict[str, Any]:
    """Loads a checkpoint into ``model`` (and ``optimizer``); returns its metadata.

    ``expect`` holds metadata fields that must match (the model's name and sizes): a
    checkpoint of another model is refused before anything is loaded.
    """
    meta = read_meta(path)
    wrong = {k: (meta.get(k), v) for k, v in expect.items() if meta.get(k) != v}
    if wrong:
        found = ", ".join(f"{k} {got!r} (expected {want!r})" for k, (got, want) in wrong.items())
        raise MorecError(f"{path}: checkpoint of another model: {found}")
    state: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        _materialise_state(optimizer)
        state["optimizer"] = optimizer.state_dict()
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return meta


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
