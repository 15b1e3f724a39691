"""Full-ranking scores of a reference backbone (a :data:`~morec_rec.eval.ranking.Scorer`)."""

from __future__ import annotations

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from morec_rec.eval.ranking import RankingTask
from morec_rec.pipeline.batch import features_kjt


class ModelScorer:
    """Scores by a backbone's ``user_vectors(features) @ item_vectors(features).T``.

    The item vectors are computed once (all item ids, one call); each chunk of users is
    one call with the features the model reads (``user_id`` and/or ``history``).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device = torch.device("cpu")) -> None:
        self._model = model
        self._device = device
        self._items: torch.Tensor | None = None

    def __call__(self, users: RankingTask) -> torch.Tensor:
        if self._items is None:
            ids = torch.arange(users.num_items)
            features = self._features({"item_id": (ids, torch.ones_like(ids))})
            self._items = self._model.item_vectors(features)
        user_ids = torch.from_numpy(users.user_id)
        given = {
            "user_id": (user_ids, torch.ones_like(user_ids)),
            "history": (torch.from_numpy(users.history_values),
                        torch.from_numpy(np.diff(users.history_offsets))),
        }
        vectors = self._model.user_vectors(self._features(given))
        return (vectors @ self._items.T).float()

    def _features(self, given: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> KeyedJaggedTensor:
        names = self._model.feature_names
        return features_kjt(names, {k: v for k, v in given.items() if k in names}).to(self._device)
