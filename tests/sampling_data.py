"""A small prepared dataset with known groups and prices, for the sampler's tests.

100 items in 5 categories (item i in category i % 5) with price i (item 0 is free), and
240 users with 20 distinct items each: 4,320 training rows in row groups of 250 rows, in
shards of 1,000. Categories are not folded (``min_group_share=0``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from morec_rec.config import PrepareConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.data.prepare import prepare
from morec_rec.data.raw import RawData

NUM_ITEMS, NUM_USERS, PER_USER = 100, 240, 20


def make_dataset(root: Path) -> PreparedDataset:
    rng = np.random.default_rng(0)
    items = np.concatenate([rng.choice(NUM_ITEMS, PER_USER, replace=False)
                            for _ in range(NUM_USERS)])
    raw = RawData(
        pa.table({
            "user": [f"u{u:03d}" for u in np.repeat(np.arange(NUM_USERS), PER_USER)],
            "item": [f"i{i:03d}" for i in items],
            "timestamp": np.tile(np.arange(PER_USER), NUM_USERS),
            "rating": pa.nulls(len(items), pa.float64()),
        }),
        pa.table({
            "item": [f"i{i:03d}" for i in range(NUM_ITEMS)],
            "price": np.arange(NUM_ITEMS, dtype=np.float64),
            "category": [f"c{i % 5}" for i in range(NUM_ITEMS)],
        }),
        {"name": "sampler-test"},
    )
    config = PrepareConfig(k_core=3, min_group_share=0.0, row_group_size=250,
                           rows_per_shard=1000, history_length=5)
    prepare(raw, root, config)
    return PreparedDataset.open(root)
