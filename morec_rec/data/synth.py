"""Synthetic implicit-feedback data with learnable structure and conflicting objectives.

Generative model (every draw from one seed; ``C`` categories, ``d`` latent dimensions):

* Categories have Zipf sizes (share of items ∝ rank^-s) and random unit centroids ``μ_c``;
  an item of category ``c`` has the latent vector ``v_e = μ_c + σ_item·g_e``.
* Popularity is a power law: item bias ``b_e = -a·log(rank_e)`` over a random item ranking.
* Price is log-normal: a per-category mean, plus a negative slope in ``b_e`` (popular items
  are cheaper, so revenue conflicts with accuracy); a few items are free.
* A user has a taste mixture ``w_u ~ Dirichlet(κ·π)`` over categories with ``π ∝ share^γ``
  and the latent vector ``t_u = Σ_c w_uc·μ_c + σ_user·g_u``. With γ < 1 a small category
  has more fans per item than a large one, and its fans' taste points elsewhere than the
  majority's: an accuracy-trained model serves them worst, so fairness conflicts too.
* Activity ``n_u`` is log-normal (heavy-tailed, a minority below a 5-core). The user's items
  are ``n_u`` draws without replacement from softmax(t_u·v_e/τ + b_e), by Gumbel-top-k.
* Time: a user is active over a random window of the time span, at uniformly scattered
  timestamps, with the items in a random order, so that any position (the held-out last
  one included) is a draw from the user's own distribution. (Category sessions would make
  the last session as likely a minor category as the main one, so held-out items would
  under-represent the user's taste.)

The output depends on the seed, the profile and :data:`_CHUNK_ELEMENTS` only; floating-point
scores come from a BLAS matrix product, so tables are identical for a seed on one machine and
numpy build, and across machines up to float32 rounding of near-tied Gumbel keys.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pyarrow as pa

from morec_rec.data.raw import RawData

_SECONDS_PER_DAY = 86_400

#: Scores (users × items) held per chunk of users; bounds memory (about 20 bytes per element
#: at the peak) and is part of the generator's definition: changing it changes the data.
_CHUNK_ELEMENTS = 1 << 22


@dataclasses.dataclass(frozen=True)
class SynthProfile:
    """Parameters of the generative model (see the module docstring for the symbols)."""

    num_users: int
    num_items: int
    num_categories: int
    #: s: category ``c`` (0-based) holds a share of the items ∝ (c + 1)^-s.
    category_exponent: float = 1.0
    #: d and the spreads of item / user latent vectors around their centroid(s).
    latent_dim: int = 32
    item_spread: float = 0.8
    user_spread: float = 0.5
    #: κ: total Dirichlet concentration of a user's category mixture (small: few categories).
    taste_concentration: float = 0.5
    #: γ: prior weight of a category in users' tastes ∝ (item share)^γ.
    taste_size_exponent: float = 0.5
    #: τ: softmax temperature of the taste term (lower: tastes dominate popularity).
    temperature: float = 0.15
    #: a: the item bias is -a·log(popularity rank), rank 1 the most popular.
    popularity_exponent: float = 0.9
    #: n_u = round(LogNormal(log(median), sigma)), clipped to [1, max_activity].
    activity_median: float = 15.0
    activity_sigma: float = 1.0
    max_activity: int = 500
    #: Price: exp(N(log(price_median) + category offset, price_sigma)) · exp(-slope · z(b_e)),
    #: category offsets ~ N(0, price_category_sigma), z the standardised item bias.
    price_median: float = 20.0
    price_sigma: float = 0.5
    price_category_sigma: float = 0.6
    price_popularity_slope: float = 0.5
    #: Share of items whose price is 0.
    free_share: float = 0.01
    #: Timestamps lie in [start_time, start_time + time_span_days days).
    start_time: int = 1_420_070_400  # 2015-01-01T00:00:00Z
    time_span_days: float = 730.0
    #: A user's active window is a uniform share in [min_active_share, 1] of the span.
    min_active_share: float = 0.05

    def __post_init__(self) -> None:
        positive = ("num_users", "num_items", "num_categories", "latent_dim", "temperature",
                    "activity_median", "max_activity", "price_median", "time_span_days",
                    "taste_concentration")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"SynthProfile.{name} must be > 0, got {getattr(self, name)!r}")
        if self.num_categories > self.num_items:
            raise ValueError("SynthProfile: num_categories must not exceed num_items")
        if self.max_activity > self.num_items:
            raise ValueError("SynthProfile: max_activity must not exceed num_items")
        if not 0 <= self.free_share < 1 or not 0 < self.min_active_share <= 1:
            raise ValueError("SynthProfile: free_share must be in [0, 1), "
                             "min_active_share in (0, 1]")
        if self.start_time < 0:
            raise ValueError("SynthProfile.start_time must be >= 0")


PROFILES: dict[str, SynthProfile] = {
    # Tests: about 3.5k interactions; generation and preparation in well under a second.
    "tiny": SynthProfile(
        num_users=300, num_items=150, num_categories=6, latent_dim=16,
        activity_median=10.0, activity_sigma=0.7, max_activity=60,
    ),
    # The demo's default data: ~220k interactions; MF-BPR peaks within ~10 epochs of about
    # 1.5 s each on two CPU cores.
    "demo": SynthProfile(
        num_users=10_000, num_items=2_000, num_categories=20,
        activity_median=15.0, activity_sigma=0.9, max_activity=400,
    ),
    # The demo's size with six categories of steeply falling size (the smallest holds about
    # 2% of the items and 4% of the held-out rows): small fairness groups that are measurable.
    "skewed": SynthProfile(
        num_users=10_000, num_items=2_000, num_categories=6, category_exponent=2.0,
        activity_median=15.0, activity_sigma=0.9, max_activity=400,
    ),
    # The paper's Xbox scale after a 5-core: 154,210 users, 5,161 items, 6,058,454 rows
    # (seed 0 gives 154,352 / 5,161 / 6,054,076).
    "xbox": SynthProfile(
        num_users=163_000, num_items=5_161, num_categories=30,
        activity_median=22.7, activity_sigma=1.0, max_activity=1_300,
    ),
}


@dataclasses.dataclass(frozen=True)
class _Catalogue:
    """Items and category centroids; ``I`` items, ``C`` categories, ``d`` dimensions."""

    category: np.ndarray  # (I,) int64 in [0, C)
    vectors: np.ndarray  # (I, d) float32
    bias: np.ndarray  # (I,) float32, log-popularity
    price: np.ndarray  # (I,) float64, >= 0, in cents precision
    centroids: np.ndarray  # (C, d) float64, unit rows
    taste_prior: np.ndarray  # (C,) float64, sums to 1


def generate(profile: SynthProfile, seed: int) -> RawData:
    """Draws a dataset from ``profile``; the same ``(profile, seed)`` gives equal tables.

    Interactions are ordered by user index then time, without ratings; users are ``"u<k>"``
    and items ``"i<k>"``. Every item, interacted with or not, is in the catalogue.
    """
    catalogue_seq, users_seq, chunks_seq = np.random.SeedSequence(seed).spawn(3)
    catalogue = _catalogue(profile, np.random.default_rng(catalogue_seq))
    users_rng = np.random.default_rng(users_seq)
    tastes = _tastes(profile, catalogue, users_rng)
    activity = _activity(profile, users_rng)
    user, item, timestamp = _interactions(profile, catalogue, tastes, activity, chunks_seq)
    return RawData(
        interactions=pa.table({
            "user": _names("u", profile.num_users).take(user),
            "item": _names("i", profile.num_items).take(item),
            "timestamp": timestamp,
            "rating": pa.nulls(len(user), pa.float64()),
        }),
        items=pa.table({
            "item": _names("i", profile.num_items),
            "price": catalogue.price,
            "category": _names("c", profile.num_categories).take(catalogue.category),
        }),
        source={
            "name": "synth",
            "profile": _profile_name(profile) or dataclasses.asdict(profile),
            "seed": seed,
            "parameters": dataclasses.asdict(profile),
        },
    )


def _profile_name(profile: SynthProfile) -> str | None:
    return next((name for name, p in PROFILES.items() if p == profile), None)


def _names(prefix: str, n: int) -> pa.Array:
    """``[prefix + "0", ..., prefix + str(n - 1)]`` as an Arrow string array."""
    return pa.array(np.strings.add(prefix, np.arange(n).astype(np.str_)), pa.string())


def _zipf_counts(total: int, parts: int, exponent: float) -> np.ndarray:
    """(parts,) int64 sizes ∝ (rank)^-exponent, each >= 1, summing to ``total``."""
    share = np.arange(1, parts + 1, dtype=np.float64) ** -exponent
    share /= share.sum()
    counts = np.floor(share * (total - parts)).astype(np.int64) + 1
    counts[: total - counts.sum()] += 1  # the remainder to the largest parts
    return counts


def _catalogue(profile: SynthProfile, rng: np.random.Generator) -> _Catalogue:
    """Categories, latent vectors, popularity and prices of all items."""
    num_items, d = profile.num_items, profile.latent_dim
    sizes = _zipf_counts(num_items, profile.num_categories, profile.category_exponent)
    category = rng.permutation(np.repeat(np.arange(profile.num_categories), sizes))
    centroids = rng.standard_normal((profile.num_categories, d))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    vectors = centroids[category] + profile.item_spread / np.sqrt(d) * rng.standard_normal(
        (num_items, d))
    rank = rng.permutation(num_items) + 1
    bias = -profile.popularity_exponent * np.log(rank)
    taste_prior = sizes ** profile.taste_size_exponent
    return _Catalogue(
        category=category,
        vectors=vectors.astype(np.float32),
        bias=bias.astype(np.float32),
        price=_prices(profile, category, bias, rng),
        centroids=centroids,
        taste_prior=taste_prior / taste_prior.sum(),
    )


def _prices(profile: SynthProfile, category: np.ndarray, bias: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:
    """(I,) float64 prices rounded to cents: log-normal, cheaper when more popular."""
    offset = profile.price_category_sigma * rng.standard_normal(profile.num_categories)
    z = (bias - bias.mean()) / bias.std()
    log_price = (np.log(profile.price_median) + offset[category]
                 + profile.price_sigma * rng.standard_normal(len(category))
                 - profile.price_popularity_slope * z)
    price = np.round(np.exp(log_price), 2)
    price[rng.random(len(category)) < profile.free_share] = 0.0
    return price


def _tastes(profile: SynthProfile, catalogue: _Catalogue,
            rng: np.random.Generator) -> np.ndarray:
    """(U, d) float32 user vectors: a Dirichlet mixture of centroids plus noise."""
    alpha = profile.taste_concentration * catalogue.taste_prior
    mixture = rng.dirichlet(alpha, size=profile.num_users)
    noise = profile.user_spread / np.sqrt(profile.latent_dim) * rng.standard_normal(
        (profile.num_users, profile.latent_dim))
    return (mixture @ catalogue.centroids + noise).astype(np.float32)


def _activity(profile: SynthProfile, rng: np.random.Generator) -> np.ndarray:
    """(U,) int64 interactions per user: log-normal, clipped to [1, max_activity]."""
    n = rng.lognormal(np.log(profile.activity_median), profile.activity_sigma, profile.num_users)
    return np.clip(np.round(n), 1, profile.max_activity).astype(np.int64)


def _user_chunks(activity: np.ndarray, num_items: int) -> Iterator[np.ndarray]:
    """User indices in order of activity, in chunks of at most ``_CHUNK_ELEMENTS`` scores.

    Users of similar activity share a chunk, so the chunk's top-k is not much wider than
    any of its users needs.
    """
    order = np.argsort(activity, kind="stable")
    rows = max(1, _CHUNK_ELEMENTS // num_items)
    return (order[i : i + rows] for i in range(0, len(order), rows))


def _interactions(profile: SynthProfile, catalogue: _Catalogue, tastes: np.ndarray,
                  activity: np.ndarray, seq: np.random.SeedSequence,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, timestamp) arrays of all interactions, sorted by user then time."""
    chunks = list(_user_chunks(activity, profile.num_items))

    def sample(users: np.ndarray, chunk_seq: np.random.SeedSequence) -> tuple[np.ndarray, ...]:
        rng = np.random.default_rng(chunk_seq)
        return _sample_chunk(profile, catalogue, tastes[users], activity[users], rng)

    # numpy releases the GIL in the heavy steps; each chunk has its own random stream, so
    # the result does not depend on the number of threads or their schedule.
    with ThreadPoolExecutor(_threads()) as pool:
        parts = list(pool.map(sample, chunks, seq.spawn(len(chunks))))
    chunked_users = np.concatenate(chunks)
    user = np.repeat(chunked_users, activity[chunked_users])
    item = np.concatenate([p[0] for p in parts])
    timestamp = np.concatenate([p[1] for p in parts])
    order = np.argsort(user, kind="stable")  # keeps each user's items in time order
    return user[order], item[order], timestamp[order]


def _threads() -> int:
    """Worker threads: the usable CPUs, at most 4 (each holds a chunk's scores)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def _sample_chunk(profile: SynthProfile, catalogue: _Catalogue, tastes: np.ndarray,
                  n: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Items and timestamps of ``m`` users, flattened user by user in time order.

    Args:
        tastes: (m, d) user vectors. n: (m,) interactions per user.
    Returns:
        (sum(n),) int64 item indices and (sum(n),) int64 timestamps in seconds.
    """
    chosen = _gumbel_top_k(catalogue, tastes, n, profile.temperature, rng)  # (m, k)
    valid = np.arange(chosen.shape[1]) < n[:, None]
    chosen = np.take_along_axis(chosen, _shuffle_valid(valid, rng), axis=1)
    timestamp = _timestamps(n, chosen.shape[1], profile, rng)
    return chosen[valid], timestamp[valid]


def _gumbel_top_k(catalogue: _Catalogue, tastes: np.ndarray, n: np.ndarray,
                  temperature: float, rng: np.random.Generator) -> np.ndarray:
    """(m, max(n)) item indices: row u starts with n[u] draws without replacement.

    Perturbing logits with Gumbel noise (-log of a standard exponential) and keeping the
    top n items samples n items without replacement from the softmax of the logits.
    """
    num_items, k = len(catalogue.bias), int(n.max())
    keys = tastes @ catalogue.vectors.T  # (m, I) float32
    keys *= np.float32(1.0 / temperature)
    keys += catalogue.bias
    noise = rng.standard_exponential(keys.shape, dtype=np.float32)
    np.maximum(noise, np.finfo(np.float32).tiny, out=noise)  # float32 draws can be 0
    keys -= np.log(noise, out=noise)
    top = np.argpartition(keys, num_items - k, axis=1)[:, num_items - k :]
    # Rows with n[u] < k keep their n[u] best keys: sort the k candidates, best first.
    best_first = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1)
    return np.take_along_axis(top, best_first, axis=1)


def _shuffle_valid(valid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(m, k) per-row permutations: a uniform shuffle of the valid entries, kept first.

    The Gumbel-top-k order is best-first; time order must not be.
    """
    key = rng.random(valid.shape)
    key[~valid] = np.inf
    return np.argsort(key, axis=1)


def _timestamps(n: np.ndarray, k: int, profile: SynthProfile,
                rng: np.random.Generator) -> np.ndarray:
    """(m, k) int64 seconds: row u's first n[u] entries increase within its active window.

    The first n entries are the order statistics of n uniform points in the window
    (normalised cumulative sums of n + 1 exponential gaps); later entries are filler.
    """
    m = len(n)
    span = profile.time_span_days * _SECONDS_PER_DAY
    window = span * rng.uniform(profile.min_active_share, 1.0, m)
    start = profile.start_time + rng.uniform(0.0, 1.0, m) * (span - window)
    gaps = rng.standard_exponential((m, k + 1))
    gaps[np.arange(k + 1) > n[:, None]] = 0.0
    position = np.cumsum(gaps, axis=1)
    position = position[:, :k] / position[:, -1:]
    return np.floor(start[:, None] + position * window[:, None]).astype(np.int64)
