"""Full-ranking scores of a reference backbone (a :data:`~morec_rec.plugin.eval.ranking.Scorer`)."""

from __future__ import annotations

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from morec_rec.jobs.collate import features_kjt
from morec_rec.plugin.eval.ranking import RankingTask


class ModelScorer:
    """Scores by a backbone's ``user_vectors(features) @ item_vectors(features).T``.

    Each chunk of users is two model calls: every item's vector, and the users' vectors
    from the features the model reads (``user_id`` and/or ``history``). Nothing is kept
    between calls, so one scorer serves every validation pass of a model in training.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device = torch.device("cpu")) -> None:
        self._model = model
        self._device = device

    def __call__(self, users: RankingTask) -> torch.Tensor:
        ids = torch.arange(users.num_items)
        items = self._model.item_vectors(self._features({"item_id": (ids, torch.ones_like(ids))}))
        user_ids = torch.from_numpy(users.user_id)
        given = {
            "user_id": (user_ids, torch.ones_like(user_ids)),
            "history": (torch.from_numpy(users.history_values),
                        torch.from_numpy(np.diff(users.history_offsets))),
        }
        vectors = self._model.user_vectors(self._features(given))
        return (vectors @ items.T).float()

    def _features(self, given: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> KeyedJaggedTensor:
        names = self._model.feature_names
        return features_kjt(names, {k: v for k, v in given.items() if k in names}).to(self._device)
