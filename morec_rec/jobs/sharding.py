"""DistributedModelParallel and its optimizer for a backbone, on CPU (gloo) or CUDA (NCCL).

Tables are row-wise sharded and trained by FBGEMM's fused optimizer, in the backward
pass; every other parameter is data-parallel (DDP) and trained by ``torch.optim.Adam``.

FBGEMM's CPU kernels have no Adam (its fused CPU optimizers are SGD and the Adagrad
variants), and its dense CPU kernel pools sequences, so no sharded EmbeddingCollection
can train with Adam on CPU. There, with the default ``table_optimizer=ADAM``, the tables
stay unsharded (replicated on every rank) and out of DDP; each is looked up once a step
(:class:`ReplicatedEmbeddingCollection`), giving one sparse gradient, and
:class:`~morec_rec.jobs.row_wise_adam.RowWiseAdam` averages the touched rows over the
ranks and updates only those rows. That is what FBGEMM's fused Adam does on CUDA, and a
step's cost does not grow with the tables.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.model_parallel import (
    DefaultDataParallelWrapper,
    DistributedModelParallel,
)
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor
from torchrec.sparse.tensor_dict import maybe_td_to_kjt

from morec_rec.errors import MorecError
from morec_rec.jobs.row_wise_adam import RowWiseKeyedOptimizer

logger = logging.getLogger(__name__)

#: Fused table optimizers that FBGEMM's CPU kernels implement.
CPU_FUSED = (EmbOptimType.EXACT_SGD, EmbOptimType.EXACT_ADAGRAD,
             EmbOptimType.EXACT_ROWWISE_ADAGRAD)


def shard(model: nn.Module, device: torch.device, lr: float = 1e-3, weight_decay: float = 0.0,
          *, table_optimizer: EmbOptimType = EmbOptimType.ADAM,
          ) -> tuple[DistributedModelParallel, KeyedOptimizer]:
    """Wraps ``model`` in DistributedModelParallel over the default process group.

    Args:
        model: a backbone whose tables are in ``EmbeddingCollection`` modules, created
            alike on every rank (same seed); sharded tables may be on the ``meta`` device.
        device: this rank's device.
        lr, weight_decay: of every optimizer (weight decay as an L2 term in the gradient,
            as ``torch.optim.Adam``'s).
        table_optimizer: FBGEMM's fused optimizer for the sharded tables. On CPU it must
            be one of :data:`CPU_FUSED`, or ADAM, which keeps the tables unsharded (see
            the module docstring).

    Returns:
        The DMP model and the optimizer to hand to ``TrainPipelineSparseDist``, combining
        the tables' fused optimizer (in DMP's ``fused_optimizer``; its ``step`` does
        nothing, the update happens in the backward pass),
        :class:`~morec_rec.jobs.row_wise_adam.RowWiseAdam` over unsharded tables (CPU
        with ADAM) and Adam over every other parameter. Call ``pipeline.detach()`` before
        scoring with ``model.module``: the pipeline replaces the sharded modules' forward
        while attached.
    """
    replicate = device.type == "cpu" and table_optimizer == EmbOptimType.ADAM
    if device.type == "cpu" and not replicate and table_optimizer not in CPU_FUSED:
        raise MorecError(f"table optimizer {table_optimizer.value} has no FBGEMM CPU kernel; "
                         f"use adam or one of {', '.join(o.value for o in CPU_FUSED)}")
    if replicate and any(p.is_meta for p in model.parameters()):
        raise MorecError("unsharded tables need a model created on CPU, not on the meta device")
    sharder = EmbeddingCollectionSharder(fused_params={
        "optimizer": table_optimizer, "learning_rate": lr,
        "weight_decay": weight_decay, "weight_decay_mode": WeightDecayMode.L2,
    })
    tables = _replicate_tables(model) if replicate else set()
    plan = ShardingPlan({} if replicate else _row_wise_plan(model, sharder, device))
    dmp = DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(dist.group.WORLD), device=device, plan=plan,
        sharders=[sharder], data_parallel_wrapper=DefaultDataParallelWrapper(
            params_to_ignore=sorted(tables)))
    rest = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    optimizers: list[KeyedOptimizer] = [dmp.fused_optimizer]
    if tables:
        optimizers.append(RowWiseKeyedOptimizer(
            {name: p for name, p in rest.items() if name in tables}, lr, weight_decay))
    dense = {name: p for name, p in rest.items() if name not in tables}
    if dense:  # a torch optimizer refuses an empty parameter list
        optimizers.append(KeyedOptimizerWrapper(
            dense, lambda params: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)))
    return dmp, CombinedOptimizer(optimizers)


class ReplicatedEmbeddingCollection(EmbeddingCollection):
    """An EmbeddingCollection that looks each table up once a forward, over all its
    features' ids together, instead of once a feature.

    The output is ``EmbeddingCollection``'s. What changes is the backward: a table gets
    one sparse gradient per step instead of one per feature, which autograd would add
    (a copy of every row gradient into a zeroed buffer). :func:`_replicate_tables` gives
    an unsharded collection this class, as DistributedModelParallel swaps in a sharded
    one; parameters and ``state_dict`` keys stay the same.
    """

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        features = maybe_td_to_kjt(features, None)
        by_feature = features.to_dict()
        embedded: dict[str, JaggedTensor] = {}
        for table, feature_names, embedding_names in zip(
                self.embeddings.values(), self._feature_names,
                self._embedding_names_by_table):
            jagged = [by_feature[name] for name in feature_names]
            ids = [jt.values() for jt in jagged]
            rows = table(input=torch.cat(ids)).float().split([i.numel() for i in ids])
            # Indexing, not iterating, keeps the split traceable by torch.fx, through
            # which TrainPipelineSparseDist looks for sharded modules.
            for k, (name, jt) in enumerate(zip(embedding_names, jagged)):
                embedded[name] = JaggedTensor(
                    values=rows[k], lengths=jt.lengths(),
                    weights=jt.values() if self._need_indices else None)
        return embedded


def _replicate_tables(model: nn.Module) -> set[str]:
    """Makes every EmbeddingCollection's tables give sparse gradients, and every plain
    one a :class:`ReplicatedEmbeddingCollection`; the names of the tables' weights."""
    logger.info("FBGEMM has no fused Adam on CPU: embedding tables stay unsharded, "
                "trained row-wise by RowWiseAdam")
    names = set()
    for path, module in model.named_modules():
        if isinstance(module, EmbeddingCollection):
            if type(module) is EmbeddingCollection:  # a subclass keeps its own forward
                module.__class__ = ReplicatedEmbeddingCollection
            for name, table in module.embeddings.items():
                table.sparse = True
                names.add(f"{path}.embeddings.{name}.weight")
    return names


def _row_wise_plan(model: nn.Module, sharder: EmbeddingCollectionSharder,
                   device: torch.device) -> dict[str, Any]:
    """Every table of every EmbeddingCollection row-wise over all ranks, fused kernel."""
    fused = EmbeddingComputeKernel.FUSED.value
    return {
        path: construct_module_sharding_plan(
            module, {table.name: row_wise(compute_kernel=fused)
                     for table in module.embedding_configs()},
            sharder=sharder, device_type=device.type)
        for path, module in model.named_modules() if isinstance(module, EmbeddingCollection)
    }
