"""TorchRec's way in: a :class:`~morec_rec.plugin.segments.SegmentedBatch` is ``Pipelineable``.

TorchRec's pipelines accept a batch that is a tensor or a ``Pipelineable``. The plugin's
core imports nothing of TorchRec, so the registration happens only where TorchRec is
already loaded: a job that builds a TorchRec pipeline has imported it before it asks
MoRec for a loader.
"""

from __future__ import annotations

import sys

from morec_rec.plugin.segments import SegmentedBatch


def register_pipelineable() -> None:
    """Registers SegmentedBatch as a virtual ``torchrec.streamable.Pipelineable``, if
    TorchRec is loaded; does nothing otherwise (a plain PyTorch job)."""
    streamable = sys.modules.get("torchrec.streamable")
    if streamable is not None:
        streamable.Pipelineable.register(SegmentedBatch)
