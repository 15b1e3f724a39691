"""Preparation: raw interactions and catalogue → the prepared on-disk format.

Every source goes through the same steps, all vectorised (pyarrow compute and numpy):

1. rating filter (rows rated below ``min_rating``; only where the source has ratings);
2. one interaction per (user, item) pair: the earliest;
3. iterative k-core on users and items;
4. missing prices and categories: imputed or an error (``PrepareConfig.missing``);
5. per-user order by time, ties broken by a seeded hash of the pair (so the order does
   not depend on the row order of the source file); leave-one-out split: the last
   interaction → test, the second last → valid, the rest → train;
6. contiguous ids (users and items in the sorted order of their original ids);
7. popularity groups from training counts (no more groups than items: an error),
   fairness groups from categories (the smallest folded into "other"), and the
   ``history`` column;
8. written to a temporary directory beside ``out`` and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from morec_rec.config import PrepareConfig
from morec_rec.data import arrays
from morec_rec.data import format as fmt
from morec_rec.data.groups import fairness_groups, popularity_groups
from morec_rec.data.raw import RawData
from morec_rec.errors import MorecError
from morec_rec.version import __version__

UNKNOWN_CATEGORY = "unknown"


@dataclasses.dataclass
class _Interactions:
    """Interactions as parallel numpy arrays over dictionary codes of the original ids."""

    user: np.ndarray  # int64 codes into ``user_ids`` (sorted original ids)
    item: np.ndarray  # int64 codes into ``item_ids``
    timestamp: np.ndarray  # int64 seconds
    user_ids: pa.Array
    item_ids: pa.Array


def prepare(raw: RawData, out: Path, config: PrepareConfig) -> dict[str, Any]:
    """Prepares ``raw`` into the directory ``out`` and returns its manifest.

    ``out`` must not exist or be an empty directory. Nothing appears at ``out`` unless the
    whole dataset was written.
    """
    out = Path(out)
    check_output(out)
    counts: dict[str, Any] = {"raw_interactions": raw.interactions.num_rows}
    table = _filter_ratings(raw.interactions, config.min_rating, counts)
    where = _source_file(raw.source)
    data = _k_core(_first_per_pair(_encode(table), counts), config.k_core, counts, where)

    order = np.lexsort((_pair_hash(data, config.seed), data.timestamp, data.user))
    user_id, user_codes = _compact(data.user[order])
    item_id, item_codes = _compact(data.item[order])
    user_ids, item_ids = data.user_ids.take(user_codes), data.item_ids.take(item_codes)
    if config.popularity_groups > len(item_ids):
        raise MorecError(
            f"config: popularity_groups = {config.popularity_groups} exceeds the "
            f"{len(item_ids):,} items left after filtering in {where} (each group needs an "
            "item): choose at most that many"
        )
    split = _leave_one_out(user_id, len(user_ids))
    price, category = _item_attributes(item_ids, raw.items, config.missing, counts,
                                       _source_file(raw.source, catalogue=True), where)

    train_count = np.bincount(item_id[split == 0], minlength=len(item_ids))
    popularity = popularity_groups(train_count, config.popularity_groups, config.popularity_rule)
    fairness = fairness_groups(
        category,
        train_items=item_id[split == 0],
        valid_items=item_id[split == 1],
        test_items=item_id[split == 2],
        min_share=config.min_group_share,
    )
    rows = _Rows(
        user_id=user_id,
        item_id=item_id,
        timestamp=data.timestamp[order],
        item_price=price,
        item_fairness=fairness.group_of_item,
        item_popularity=popularity.group_of_item,
        history_length=config.history_length,
    )
    items = pa.table(
        {
            "item_id": np.arange(len(item_ids), dtype=np.int32),
            "original_id": item_ids,
            "price": price,
            "category": category,
            "fairness_group": fairness.group_of_item,
            "popularity_group": popularity.group_of_item,
            "train_count": train_count.astype(np.int64),
        },
        schema=fmt.ITEM_SCHEMA,
    )
    users = pa.table(
        {"user_id": np.arange(len(user_ids), dtype=np.int32), "original_id": user_ids},
        schema=fmt.USER_SCHEMA,
    )
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        "num_users": len(user_ids),
        "num_items": len(item_ids),
        "num_interactions": {
            s: int(np.count_nonzero(split == i)) for i, s in enumerate(fmt.SPLITS)
        },
        "history_length": config.history_length,
        "groups": {"fairness": fairness.describe(), "popularity": popularity.describe()},
        "price": _price_statistics(price, item_id[split == 0], counts),
        "filtering": counts,
        "order": "rows of a user by timestamp; ties by a seeded hash of the (user, item) "
                 "pair's ranks among the ids left after the rating filter, independent of "
                 "the source's row order",
        "parameters": dataclasses.asdict(config),
        "source": raw.source,
        "created_by": _versions(),
    }
    train_rows = np.random.default_rng(config.seed).permutation(np.flatnonzero(split == 0))
    with _staging(out) as tmp:
        pq.write_table(items, tmp / fmt.ITEMS)
        pq.write_table(users, tmp / fmt.USERS)
        for code, name in ((1, "valid"), (2, "test")):
            pq.write_table(rows.take(np.flatnonzero(split == code)), tmp / f"{name}.parquet",
                           row_group_size=config.row_group_size)
        manifest["shards"] = _write_train(tmp, rows, train_rows, config)
        (tmp / fmt.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out``, renamed to ``out`` once the block has written
    it; removed if the block fails (a write error is a MorecError naming the file).

    The directory is named after this process, ``.<out>.partial-<pid>``: one left by a
    process that was killed (SIGKILL) is removed by the next that stages ``out``.
    """
    _remove_abandoned(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # a killed process's whose pid is ours again
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror or str(e).strip().partition("\n")[0] or type(e).__name__
        raise MorecError(f"{e.filename or out}: cannot be written ({reason})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if out.exists():
            out.rmdir()  # checked to be empty before any work
        os.rename(tmp, out)
    except OSError:
        # Written in full: kept, for the user to move once ``out`` is theirs again.
        raise MorecError(f"{out}: something else was written there meanwhile; the prepared "
                         f"data is complete in {tmp}") from None


def _remove_abandoned(out: Path) -> None:
    """Removes the staging directories of ``out`` whose process is gone."""
    for staged in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        pid = staged.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            shutil.rmtree(staged, ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts: signalling it is refused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def check_output(out: Path) -> None:
    """Raises :class:`MorecError` unless ``out`` is absent or an empty directory, not a
    symbolic link (which the final rename would replace or fail on), and can be written
    (staged beside it: see :func:`check_writable`)."""
    out = Path(out)
    if out.is_symlink():
        raise MorecError(f"{out}: output is a symbolic link (give a directory path instead)")
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise MorecError(f"{str(out) or '.'}: output holds the current directory (give the "
                         "path of a directory to create)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MorecError(f"{out}: output exists and is not an empty directory")
    check_writable(out, staged=True)


def check_writable(out: Path, *, staged: bool = False) -> None:
    """Raises :class:`MorecError` naming ``out`` unless it can be written: it is no file,
    and a directory can be created in it (if it is a directory and not ``staged``), else in
    its nearest existing ancestor (where a ``staged`` output is written and renamed): not
    under a file, not without permission, not on a read-only file system. Creates nothing
    that it does not remove.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MorecError(f"{out}: output exists and is a file, not a directory")
    place = out.absolute() if out.is_dir() and not staged else out.absolute().parent
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        raise MorecError(f"{out}: cannot be created: {place} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".morec-write-test-", dir=place))
    except OSError as e:
        raise MorecError(f"{out}: cannot create a directory in {place} ({e.strerror})") from None


def _filter_ratings(table: pa.Table, min_rating: float, counts: dict[str, Any]) -> pa.Table:
    rating = table["rating"]
    if rating.null_count == len(rating):
        counts["rating_below_min"] = 0
        return table
    keep = pc.fill_null(pc.greater_equal(rating, min_rating), True)
    kept = table.filter(keep)
    counts["rating_below_min"] = table.num_rows - kept.num_rows
    return kept


def _encode(table: pa.Table) -> _Interactions:
    """Replaces original ids by their rank among the sorted distinct ids."""
    user, user_ids = arrays.encode_sorted(table["user"])
    item, item_ids = arrays.encode_sorted(table["item"])
    return _Interactions(user, item, table["timestamp"].to_numpy(), user_ids, item_ids)


def _pair_hash(data: _Interactions, seed: int) -> np.ndarray:
    """A seeded 64-bit hash (splitmix64) of each (user, item) pair of original-id ranks."""
    x = (data.user.astype(np.uint64) << np.uint64(32)) | data.item.astype(np.uint64)
    x = x ^ np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _first_per_pair(data: _Interactions, counts: dict[str, Any]) -> _Interactions:
    """Keeps the earliest interaction of each (user, item) pair."""
    order = np.lexsort((data.timestamp, data.item, data.user))
    pair = data.user[order] * len(data.item_ids) + data.item[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = pair[1:] != pair[:-1]
    counts["duplicate_pairs"] = int(len(order) - np.count_nonzero(first))
    return _select(data, order[first])


def _source_file(source: dict[str, Any], catalogue: bool = False) -> str:
    """The source file to name in an error (the source's name if it lists no files).

    The interactions file (the first), or with ``catalogue`` the item catalogue's (the
    last: ``--meta``, or the single input of a source such as Ta-Feng).
    """
    files = [str(f["path"]) for f in source.get("files", [])]
    if files:
        return files[-1] if catalogue else files[0]
    return f"source {source.get('name', 'unnamed')!r}"


def _k_core(data: _Interactions, k: int, counts: dict[str, Any], where: str) -> _Interactions:
    """Iteratively drops users and items with fewer than ``k`` interactions.

    An empty result is a :class:`MorecError` naming ``where`` (the input file).
    """
    user, item = data.user, data.item
    index = np.arange(len(user))
    iterations = 0
    while True:
        user_ok = np.bincount(user, minlength=len(data.user_ids))[user] >= k
        item_ok = np.bincount(item, minlength=len(data.item_ids))[item] >= k
        keep = user_ok & item_ok
        if keep.all():
            break
        iterations += 1
        user, item, index = user[keep], item[keep], index[keep]
    if len(index) == 0:
        raise MorecError(
            f"{where}: no interactions left after filtering (rating >= min_rating, {k}-core): "
            f"{counts['raw_interactions']} rows read"
        )
    counts["k_core"] = {
        "k": k,
        "iterations": iterations,
        "interactions_removed": int(len(data.user) - len(index)),
        "users_removed": int(len(np.unique(data.user)) - len(np.unique(user))),
        "items_removed": int(len(np.unique(data.item)) - len(np.unique(item))),
    }
    return _select(data, index)


def _select(data: _Interactions, index: np.ndarray) -> _Interactions:
    return dataclasses.replace(
        data, user=data.user[index], item=data.item[index], timestamp=data.timestamp[index]
    )


def _leave_one_out(user_id: np.ndarray, num_users: int) -> np.ndarray:
    """Split code per row (0 train, 1 valid, 2 test) for rows sorted by user and time."""
    count = np.bincount(user_id, minlength=num_users)
    end = np.cumsum(count)
    from_end = end[user_id] - 1 - np.arange(len(user_id))
    return np.where(from_end == 0, 2, np.where(from_end == 1, 1, 0)).astype(np.int8)


def _compact(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maps codes to contiguous ids 0..n-1 in code order; returns (ids, the kept codes)."""
    kept = np.unique(codes)
    return np.searchsorted(kept, codes).astype(np.int32), kept


def _item_attributes(
    item_ids: pa.Array, catalogue: pa.Table, missing: str, counts: dict[str, Any], where: str,
    interactions: str,
) -> tuple[np.ndarray, pa.Array]:
    """Price (float64) and category (string) of each item, indexed by item id.

    An item absent from the catalogue, or with a null (or blank category) field there, is
    missing that field:
    with ``missing="impute"`` its category becomes "unknown" and its price the median
    price of its category's items (of all items if its category has no price). Errors
    name ``where`` (the catalogue's file); a catalogue holding none of the items is one,
    naming ``interactions`` (their file) too.
    """
    row = pc.index_in(item_ids, value_set=catalogue["item"])  # the first row wins
    if row.null_count == len(row):
        raise MorecError(
            f"{where}: item catalogue: none of the {len(row):,} items of the interactions is "
            f"in it (e.g. {item_ids[0].as_py()!r} in {interactions}; the catalogue has e.g. "
            f"{catalogue['item'][0].as_py()!r})"
        )
    price = pc.take(catalogue["price"].combine_chunks(), row)
    category = pc.take(catalogue["category"].combine_chunks(), row)
    category = pc.if_else(pc.equal(pc.utf8_trim_whitespace(category), ""), None, category)
    counts["items_not_in_catalogue"] = row.null_count
    counts["items_missing_price"] = price.null_count
    counts["items_missing_category"] = category.null_count
    if missing == "error" and (price.null_count or category.null_count):
        field = "price" if price.null_count else "category"
        first = item_ids[pc.index(pc.is_null(price if price.null_count else category), True)]
        raise MorecError(
            f"{where}: item catalogue: {price.null_count} item(s) without a price and "
            f"{category.null_count} without a category (first: {field} of item "
            f"{first.as_py()!r}); set missing = 'impute' to impute them"
        )
    category = pc.fill_null(category, UNKNOWN_CATEGORY)
    values = price.to_numpy(zero_copy_only=False).astype(np.float64)  # null → NaN
    known = ~np.isnan(values)
    if not known.any():
        raise MorecError(f"{where}: item catalogue: no item of the interactions has a price")
    code = pc.dictionary_encode(category).indices.to_numpy()
    median = arrays.median(code[known], values[known], int(code.max()) + 1)
    fill = np.where(np.isnan(median), np.median(values[known]), median)
    values[~known] = fill[code[~known]]
    return values, category


class _Rows:
    """Interaction rows sorted by user and time, turned into Arrow tables on demand.

    The ``history`` of row i is the items of the rows before it of the same user, at most
    ``history_length`` of them; it is gathered per requested block, so memory holds only
    the block's histories, never the whole column.
    """

    def __init__(
        self,
        user_id: np.ndarray,
        item_id: np.ndarray,
        timestamp: np.ndarray,
        item_price: np.ndarray,
        item_fairness: np.ndarray,
        item_popularity: np.ndarray,
        history_length: int,
    ) -> None:
        self.user_id, self.item_id, self.timestamp = user_id, item_id, timestamp
        self.item_price = item_price
        self.item_fairness, self.item_popularity = item_fairness, item_popularity
        count = np.bincount(user_id)
        position = np.arange(len(user_id)) - (np.cumsum(count) - count)[user_id]
        self.history_size = np.minimum(position, history_length).astype(np.int32)

    def take(self, index: np.ndarray) -> pa.Table:
        """The rows at ``index`` (in that order) as a table of :data:`fmt.ROW_SCHEMA`."""
        item = self.item_id[index]
        size = self.history_size[index]
        # Row i's history is the items of rows index[i]-size[i] .. index[i]-1.
        gather, offsets = arrays.ranges(index - size, size)
        history = pa.ListArray.from_arrays(
            pa.array(offsets), pa.array(self.item_id[gather]),
            type=fmt.ROW_SCHEMA.field("history").type,
        )
        return pa.table(
            {
                "user_id": self.user_id[index],
                "item_id": item,
                "timestamp": self.timestamp[index],
                "price": self.item_price[item],
                "fairness_group": self.item_fairness[item],
                "popularity_group": self.item_popularity[item],
                "history": history,
            },
            schema=fmt.ROW_SCHEMA,
        )


def _write_train(
    root: Path, rows: _Rows, order: np.ndarray, config: PrepareConfig
) -> list[dict[str, Any]]:
    """Writes the training rows ``order`` as shards of ``rows_per_shard`` rows."""
    (root / fmt.TRAIN_DIR).mkdir()
    shards = []
    for number, begin in enumerate(range(0, len(order), config.rows_per_shard)):
        index = order[begin : begin + config.rows_per_shard]
        path = f"{fmt.TRAIN_DIR}/part-{number:05d}.parquet"
        pq.write_table(rows.take(index), root / path, row_group_size=config.row_group_size)
        shards.append({
            "path": path,
            "rows": len(index),
            "row_groups": -(-len(index) // config.row_group_size),
        })
    return shards


def _price_statistics(
    price: np.ndarray, train_items: np.ndarray, counts: dict[str, Any]
) -> dict[str, Any]:
    return {
        "item_min": float(price.min()),
        "item_max": float(price.max()),
        "item_mean": float(price.mean()),
        "item_median": float(np.median(price)),
        "item_std": float(price.std()),
        "free_items": int(np.count_nonzero(price == 0)),
        "imputed_items": counts["items_missing_price"],
        # The mean price of a training row: the normaliser of price-proportional sampling.
        "train_row_mean": float(price[train_items].mean()),
    }


def _versions() -> dict[str, str]:
    return {
        "morec_rec": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
    }
