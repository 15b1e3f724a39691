"""The backbones and their input: negatives, batches, MF-BPR, SASRec, and sharded training.

Statistical tests use a fixed seed and reject at significance 0.001.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from conftest import chi_square_p, run_torchrun
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from morec_rec.config import PrepareConfig, SamplerConfig, TrainConfig
from morec_rec.data.format import PreparedDataset
from morec_rec.errors import MorecError
from morec_rec.jobs import collate as batch_module
from morec_rec.jobs.cli import synthesize
from morec_rec.jobs.collate import Collator, TrainBatch, features_kjt
from morec_rec.jobs.distributed import Environment
from morec_rec.jobs.models import build_model, num_negatives, per_row_loss, representation
from morec_rec.jobs.models.mf import MatrixFactorization
from morec_rec.jobs.models.negatives import NegativeSampler
from morec_rec.jobs.models.sasrec import SASRec, SelfAttention, right_aligned
from morec_rec.jobs.sharding import shard
from morec_rec.jobs.train import training_loader
from morec_rec.plugin import segments
from morec_rec.plugin.sampling.objectives import Accuracy
from morec_rec.plugin.sampling.sampled import SampledBatch
from morec_rec.plugin.sampling.sampler import WeightedStreamSampler

ALPHA = 1e-3
COUNTS = np.array([0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 0, 89])
MF_FEATURES = ("user_id", "item_id", "neg_item_id")
SASREC_FEATURES = ("history", "item_id", "neg_item_id")


def ids(values: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, lengths) of a feature with one id per row."""
    return torch.tensor(values), torch.ones(len(values), dtype=torch.int32)


def jagged(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, lengths) of a feature with a list of ids per row."""
    values = [v for row in rows for v in row]
    return torch.tensor(values, dtype=torch.int64), torch.tensor([len(r) for r in rows])


# Negative sampling


@pytest.mark.parametrize("beta", [0.75, 1.0, 0.0])
def test_negatives_follow_count_power_without_the_positive(beta: float) -> None:
    sampler = NegativeSampler(COUNTS, beta)
    rng = np.random.default_rng(0)
    positives = rng.integers(0, len(COUNTS), 5000)
    drawn = sampler.sample(positives, 4, rng)

    assert drawn.shape == (5000, 4) and drawn.dtype == np.int64
    assert (drawn != positives[:, None]).all()
    weights = np.ones(len(COUNTS)) if beta == 0 else COUNTS.astype(float) ** beta
    per_row = np.tile(weights, (len(positives), 1))
    per_row[np.arange(len(positives)), positives] = 0  # each row's positive is excluded
    expected = 4 * (per_row / per_row.sum(1, keepdims=True)).sum(0)
    observed = np.bincount(drawn.ravel(), minlength=len(COUNTS))
    assert (observed[expected == 0] == 0).all()  # items never trained on, when beta > 0
    assert chi_square_p(observed[expected > 0], expected[expected > 0]) > ALPHA, observed


def test_a_large_beta_does_not_overflow_the_weights() -> None:
    # 1e6 ** 200 overflows a float64; (count / 1e6) ** 200 leaves the top item all the mass
    # but for underflow, and a row whose positive it is draws the next.
    sampler = NegativeSampler(np.array([999_000, 1_000_000, 10]), beta=200.0)
    drawn = sampler.sample(np.array([1, 0]), 50, np.random.default_rng(0))
    assert (drawn[0] == 0).all() and (drawn[1] == 1).all()


def test_negatives_avoid_a_positive_that_holds_almost_all_the_mass() -> None:
    sampler = NegativeSampler(np.array([1, 1, 300]), beta=1.0)
    drawn = sampler.sample(np.full(1000, 2), 10, np.random.default_rng(0))
    assert set(np.unique(drawn)) == {0, 1}


def test_negative_sampler_pickles_and_is_deterministic_for_a_seed() -> None:
    sampler = pickle.loads(pickle.dumps(NegativeSampler(COUNTS)))
    positives = np.arange(len(COUNTS))
    first = sampler.sample(positives, 3, np.random.default_rng(7))
    assert np.array_equal(first, NegativeSampler(COUNTS).sample(positives, 3,
                                                                np.random.default_rng(7)))


@pytest.mark.parametrize("buckets_per_item", [1, 16, 1000])
def test_negative_draws_are_the_inverse_cdf_of_the_generators_uniforms(
        buckets_per_item: int) -> None:
    # The draws of a seed are fixed: item k owns [cdf[k - 1], cdf[k]) of the generator's
    # uniforms scaled to the total weight, whatever order the lookups run in, whatever
    # the guide.
    sampler = NegativeSampler(COUNTS, buckets_per_item=buckets_per_item)
    cdf = np.cumsum(COUNTS.astype(float) ** 0.75)
    u = np.random.default_rng(3).random((64, 10)) * cdf[-1]
    expected = np.array([[np.flatnonzero(cdf > x)[0] for x in row] for row in u])
    np.testing.assert_array_equal(sampler.draw((64, 10), np.random.default_rng(3)), expected)


def test_collisions_are_redrawn_in_row_major_order_from_the_next_uniforms() -> None:
    # Rows whose positive is a popular item: some of their first draws hit it. Each round
    # re-draws the hits still left, in row-major order, from the generator's next uniforms.
    sampler = NegativeSampler(COUNTS)
    cdf = np.cumsum(COUNTS.astype(float) ** 0.75)
    positives = np.array([11, 9, 11, 3, 11, 8, 11, 11])
    uniforms = np.random.default_rng(5)
    expected = [[int(np.flatnonzero(cdf > u * cdf[-1])[0]) for u in row]
                for row in uniforms.random((len(positives), 4))]
    hits = [(r, c) for r in range(len(positives)) for c in range(4)
            if expected[r][c] == positives[r]]
    rounds = 0
    while hits:
        rounds += 1
        for (r, c), u in zip(hits, uniforms.random(len(hits))):
            expected[r][c] = int(np.flatnonzero(cdf > u * cdf[-1])[0])
        hits = [(r, c) for r, c in hits if expected[r][c] == positives[r]]
    assert rounds >= 2  # the case exercises the re-draw loop
    np.testing.assert_array_equal(sampler.sample(positives, 4, np.random.default_rng(5)),
                                  expected)


@pytest.mark.parametrize("counts, beta", [
    ([0, 5, 0], 0.75),  # one drawable item: its rows would have no negative
    ([1, -1, 2], 0.75),
    ([1, 2, 3], -0.5),
])
def test_negative_sampler_rejects_bad_input(counts: list[int], beta: float) -> None:
    with pytest.raises(MorecError):
        NegativeSampler(np.array(counts), beta)


def test_negative_sampler_rejects_a_guide_without_buckets() -> None:
    with pytest.raises(MorecError, match="buckets_per_item 0"):
        NegativeSampler(COUNTS, buckets_per_item=0)


# Batches


def sampled_batch(batch_index: int = 4) -> SampledBatch:
    return SampledBatch(
        user_id=torch.tensor([5, 6, 7]), item_id=torch.tensor([1, 2, 3]),
        price=torch.tensor([1.0, 2.0, 3.0]),
        fairness_group=torch.zeros(3, dtype=torch.int64),
        popularity_group=torch.zeros(3, dtype=torch.int64),
        history_values=torch.tensor([9, 8, 7]), history_lengths=torch.tensor([2, 0, 1]),
        objective=torch.tensor([0, 1, 1]), starved=torch.zeros(2, dtype=torch.int64),
        batch_index=batch_index, epoch=0, masses_version=0,
    )


def test_collator_builds_the_mf_features_alone() -> None:
    collate = Collator(MF_FEATURES, NegativeSampler(np.ones(12)), 4, seed=1)
    batch = collate(sampled_batch())

    assert batch.features.keys() == list(MF_FEATURES)
    features = batch.features.to_dict()
    assert features["user_id"].values().tolist() == [5, 6, 7]
    assert features["item_id"].values().tolist() == [1, 2, 3]
    assert features["user_id"].lengths().tolist() == [1, 1, 1]
    assert features["item_id"].lengths().tolist() == [1, 1, 1]
    assert features["neg_item_id"].lengths().tolist() == [4, 4, 4]
    negatives = features["neg_item_id"].values().view(3, 4)
    assert (negatives != torch.tensor([1, 2, 3]).unsqueeze(1)).all()
    # The features and nothing else: segment ids travel beside the batch (SegmentedBatch).
    assert [f.name for f in dataclasses.fields(batch)] == ["features"]
    assert collate.columns == ()  # the sampler need not read the history


@pytest.mark.parametrize("model, columns", [(MatrixFactorization, ()),
                                           (SASRec, ("history",))])
def test_pretraining_reads_the_history_only_for_a_model_that_takes_it(
        tiny: PreparedDataset, model: type, columns: tuple[str, ...]) -> None:
    sampler = training_loader(tiny, TrainConfig(num_workers=0),
                              Environment(0, 1, torch.device("cpu")), model.feature_names).sampler
    assert sampler.carried == columns
    assert ("history" in sampler.columns) == bool(columns)


def test_collator_builds_the_history_feature() -> None:
    collate = Collator(SASREC_FEATURES, NegativeSampler(np.ones(12)), 3, seed=1)
    assert collate.columns == ("history",)
    history = collate(sampled_batch()).features.to_dict()["history"]
    assert history.values().tolist() == [9, 8, 7]
    assert history.lengths().tolist() == [2, 0, 1]


class _Batches(torch.utils.data.IterableDataset):
    """Two collated SASRec batches, from a loader worker."""

    def __iter__(self) -> Iterator[TrainBatch]:
        collate = Collator(SASREC_FEATURES, NegativeSampler(np.ones(12)), 3, seed=1)
        return iter([collate(sampled_batch(index)) for index in (4, 5)])


def _same(a: TrainBatch, b: TrainBatch) -> bool:
    return (a.features.keys() == b.features.keys() and a.features.stride() == b.features.stride()
            and a.features.length_per_key() == b.features.length_per_key()
            and torch.equal(a.features.values(), b.features.values())
            and torch.equal(a.features.lengths(), b.features.lengths()))


@pytest.mark.parametrize("by_value", [True, False])
def test_batches_cross_from_a_loader_worker_unchanged(by_value: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A small batch is pickled by value (its arrays); over the threshold, torch's way
    # (shared memory). The worker is forked after the patch, so it reads the same threshold.
    monkeypatch.setattr(segments, "BY_VALUE_MAX_BYTES", 1 << 20 if by_value else 0)
    batch = Collator(SASREC_FEATURES, NegativeSampler(np.ones(12)), 3, seed=1)(sampled_batch())
    reducer = batch.__reduce_ex__(pickle.HIGHEST_PROTOCOL)[0]
    assert (reducer is batch_module._batch_from_arrays) == by_value
    assert _same(pickle.loads(pickle.dumps(batch)), batch)
    loader = torch.utils.data.DataLoader(_Batches(), batch_size=None, num_workers=1)
    received = list(loader)
    assert len(received) == 2 and all(_same(r, e) for r, e in zip(received, _Batches()))


def test_negatives_depend_only_on_seed_rank_and_batch_index() -> None:
    def negatives(seed: int = 1, rank: int = 0, batch_index: int = 4) -> list[int]:
        collate = Collator(MF_FEATURES, NegativeSampler(np.ones(1000)), 10, seed, rank=rank)
        return collate(sampled_batch(batch_index)).features["neg_item_id"].values().tolist()

    assert negatives() == negatives()
    assert negatives() != negatives(batch_index=5)
    assert negatives() != negatives(rank=1)
    assert negatives() != negatives(seed=2)


def test_collator_rejects_an_unknown_feature() -> None:
    with pytest.raises(MorecError, match="price"):
        Collator(("user_id", "price"), NegativeSampler(np.ones(3)), 1, seed=0)


def test_features_kjt_gives_missing_features_empty_rows() -> None:
    kjt = features_kjt(("a", "b", "c"), {"b": jagged([[1, 2], [], [3]])})
    assert kjt.keys() == ["a", "b", "c"]
    assert kjt.lengths().tolist() == [0, 0, 0, 2, 0, 1, 0, 0, 0]
    assert kjt.values().tolist() == [1, 2, 3]
    assert kjt.stride() == 3


@pytest.mark.parametrize("given", [
    {"d": ids([1])},  # not a feature
    {"a": ids([1]), "b": ids([1, 2])},  # two batch sizes
    {},
])
def test_features_kjt_rejects_bad_input(given: dict) -> None:
    with pytest.raises(MorecError):
        features_kjt(("a", "b"), given)


# MF-BPR


def mf_batch() -> TrainBatch:
    features = features_kjt(MF_FEATURES, {
        "user_id": ids([0, 1, 2]), "item_id": ids([3, 4, 5]),
        "neg_item_id": jagged([[6, 7], [3, 8], [9, 0]]),
    })
    return TrainBatch(features)


def test_mf_loss_is_bpr_over_the_table_rows() -> None:
    torch.manual_seed(0)
    model = MatrixFactorization(3, 10, embedding_dim=8)
    users = model.embeddings.embeddings["user"].weight.detach().double()  # rows 0, 1, 2
    items = model.embeddings.embeddings["item"].weight.detach().double()
    positives, negatives = torch.tensor([3, 4, 5]), torch.tensor([[6, 7], [3, 8], [9, 0]])

    loss, output = model(mf_batch())

    positive = (users * items[positives]).sum(-1)
    negative = (users.unsqueeze(1) * items[negatives]).sum(-1)
    expected = -torch.log(torch.sigmoid(positive.unsqueeze(1) - negative)).mean(1)
    torch.testing.assert_close(output.per_row_loss.double(), expected)
    torch.testing.assert_close(loss, output.per_row_loss.mean())
    assert per_row_loss(None, output) is output.per_row_loss  # MoRec's rows= of a backbone
    # The shared representation: the looked-up user, positive and negative vectors.
    user_vectors, positive_vectors, negative_vectors = representation(None, output)
    torch.testing.assert_close(user_vectors.double(), users)
    torch.testing.assert_close(positive_vectors.double(), items[positives])
    torch.testing.assert_close(negative_vectors.double(), items[negatives.reshape(-1)])


def rows_with_gradient(weight: torch.Tensor) -> set[int]:
    return set(torch.nonzero(weight.grad.abs().sum(1)).ravel().tolist())


def test_mf_gradients_reach_the_rows_used_in_both_tables() -> None:
    model = MatrixFactorization(4, 12, embedding_dim=8)
    loss, _ = model(mf_batch())
    loss.backward()
    tables = model.embeddings.embeddings
    assert rows_with_gradient(tables["user"].weight) == {0, 1, 2}
    assert rows_with_gradient(tables["item"].weight) == {0, 3, 4, 5, 6, 7, 8, 9}


def test_mf_scores_are_dot_products_of_user_and_item_rows() -> None:
    model = MatrixFactorization(4, 12, embedding_dim=8)
    users = model.user_vectors(features_kjt(MF_FEATURES, {"user_id": ids([2, 0])}))
    items = model.item_vectors(features_kjt(MF_FEATURES, {"item_id": ids(list(range(12)))}))
    assert users.shape == (2, 8) and items.shape == (12, 8)
    weights = model.embeddings.embeddings
    torch.testing.assert_close(users @ items.T,
                               weights["user"].weight[[2, 0]] @ weights["item"].weight.T)


# SASRec


def sasrec_vectors(model: SASRec, histories: list[list[int]]) -> torch.Tensor:
    return model.user_vectors(features_kjt(SASREC_FEATURES, {"history": jagged(histories)}))


@pytest.fixture
def sasrec() -> SASRec:
    torch.manual_seed(0)
    return SASRec(20, max_len=6, embedding_dim=8).eval()


def test_right_aligned_keeps_the_last_values_of_each_row() -> None:
    values = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
    padded, valid = right_aligned(values, torch.tensor([2, 0, 3]), 2)
    assert padded.squeeze(-1).tolist() == [[1, 2], [0, 0], [4, 5]]
    assert valid.tolist() == [[True, True], [False, False], [True, True]]
    padded, valid = right_aligned(values, torch.tensor([2, 0, 3]), 4)
    assert padded.squeeze(-1).tolist() == [[0, 0, 1, 2], [0, 0, 0, 0], [0, 3, 4, 5]]
    assert valid.sum(1).tolist() == [2, 0, 3]


def test_sasrec_representation_ignores_padding_and_other_rows(sasrec: SASRec) -> None:
    # The same model without room for padding: max_len 3, the last 3 positions' embeddings.
    unpadded = SASRec(20, max_len=3, embedding_dim=8).eval()
    state = sasrec.state_dict()
    unpadded.load_state_dict({**state, "encoder.positions": state["encoder.positions"][-3:]})
    alone = sasrec_vectors(unpadded, [[3, 4, 5]])
    batched = sasrec_vectors(sasrec, [[1, 2, 6, 7, 8, 9], [3, 4, 5], [], [11]])
    torch.testing.assert_close(batched[1], alone[0])


def test_sasrec_last_block_computing_the_last_query_alone_is_exact(sasrec: SASRec) -> None:
    histories = [[1, 2, 6, 7, 8, 9], [3, 4, 5], [11], [2, 3, 4, 5, 6, 7, 8, 9]]
    features = features_kjt(SASREC_FEATURES, {"history": jagged(histories)})
    history = sasrec.embeddings(features)["history"]
    encoder = sasrec.encoder
    # Every block over every position, as the original SASRec, then the last position.
    items, valid = right_aligned(history.values(), history.lengths().long(), encoder.max_len)
    x = items * math.sqrt(items.size(-1)) + encoder.positions
    keep = valid.unsqueeze(-1).to(x.dtype)
    allowed = (valid.unsqueeze(1) | torch.eye(encoder.max_len, dtype=torch.bool)).tril()
    x = x * keep
    for block in encoder.blocks:
        x = block(x, allowed.unsqueeze(1)) * keep
    torch.testing.assert_close(encoder(history), encoder.norm(x[:, -1]))


@pytest.mark.parametrize("heads", [1, 2])
def test_self_attention_is_multihead_attention_batch_first(heads: int) -> None:
    # The same seed gives the same parameters, by the same names; the same outputs and
    # gradients for (queries, x, x) under a mask, queries all positions or the last.
    torch.manual_seed(0)
    reference = torch.nn.MultiheadAttention(8, heads, batch_first=True).double()
    torch.manual_seed(0)
    ours = SelfAttention(8, heads, dropout=0.0).double()
    assert reference.state_dict().keys() == ours.state_dict().keys()
    for name, value in reference.state_dict().items():
        assert torch.equal(value, ours.state_dict()[name]), name
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    allowed = torch.rand(3, 5, 5) < 0.6
    allowed |= torch.eye(5, dtype=torch.bool)  # no query without a key
    for queries, mask in ((x, allowed), (x[:, -1:], allowed[:, -1:])):
        expected, _ = reference(queries, x, x, need_weights=False,
                                attn_mask=~mask.repeat_interleave(heads, 0))
        actual = ours(queries, x, mask.unsqueeze(1))
        torch.testing.assert_close(actual, expected)
        grads = [torch.autograd.grad(out.square().sum(), [x, *module.parameters()])
                 for out, module in ((expected, reference), (actual, ours))]
        for reference_grad, our_grad in zip(*grads):
            torch.testing.assert_close(our_grad, reference_grad)


def test_sasrec_reads_the_whole_history_up_to_max_len(sasrec: SASRec) -> None:
    long = list(range(1, 10))
    vectors = sasrec_vectors(sasrec, [long, long[-6:], long[:6], [0, *long[-5:]]])
    torch.testing.assert_close(vectors[0], vectors[1])  # only the last 6 items count
    assert not torch.allclose(vectors[0], vectors[2])
    assert not torch.allclose(vectors[1], vectors[3])  # the oldest item kept counts


def test_sasrec_empty_history_gets_the_learned_vector() -> None:
    torch.manual_seed(0)
    model = SASRec(20, max_len=6, embedding_dim=8)
    with torch.no_grad():
        model.encoder.empty.copy_(torch.arange(8.0))
    torch.testing.assert_close(sasrec_vectors(model.eval(), [[], [3]])[0], torch.arange(8.0))

    features = features_kjt(SASREC_FEATURES, {"history": jagged([[], []]), "item_id": ids([1, 2]),
                                              "neg_item_id": jagged([[3, 4, 5], [6, 7, 8]])})
    loss, _ = model.train()(TrainBatch(features))
    loss.backward()
    assert torch.isfinite(loss) and model.encoder.empty.grad.abs().sum() > 0


def test_sasrec_loss_is_binary_cross_entropy_with_the_negatives(sasrec: SASRec) -> None:
    histories, positives = [[1, 2, 3], [], [4]], torch.tensor([5, 6, 7])
    negatives = torch.tensor([[8, 9, 10], [11, 12, 13], [1, 2, 5]])
    features = features_kjt(SASREC_FEATURES, {
        "history": jagged(histories), "item_id": ids(positives.tolist()),
        "neg_item_id": jagged(negatives.tolist()),
    })
    loss, output = sasrec(TrainBatch(features))

    users = sasrec.user_vectors(features).double()
    items = sasrec.embeddings.embeddings["item"].weight.detach().double()
    positive = (users * items[positives]).sum(-1)
    negative = (users.unsqueeze(1) * items[negatives]).sum(-1)
    expected = -torch.log(torch.sigmoid(positive)) - torch.log(1 - torch.sigmoid(negative)).mean(1)
    torch.testing.assert_close(output.per_row_loss.double(), expected)
    torch.testing.assert_close(loss, output.per_row_loss.mean())
    sequence, positive_vectors, negative_vectors = representation(None, output)
    torch.testing.assert_close(sequence.double(), users)
    assert positive_vectors.shape == (len(positives), sasrec.embeddings.embedding_configs()[
        0].embedding_dim) and negative_vectors.shape[0] == negatives.numel()


# The factory


def test_build_model_and_num_negatives() -> None:
    assert isinstance(build_model("mf", 5, 7, 50), MatrixFactorization)
    sasrec = build_model("sasrec", 5, 7, 30, embedding_dim=16)
    assert isinstance(sasrec, SASRec) and sasrec.encoder.max_len == 30
    assert (num_negatives("mf"), num_negatives("sasrec")) == (10, 3)
    with pytest.raises(MorecError, match="gru4rec"):
        build_model("gru4rec", 5, 7, 50)
    with pytest.raises(MorecError, match="history_length"):
        build_model("sasrec", 5, 7, 0)
    with pytest.raises(MorecError):
        num_negatives("gru4rec")


def test_shard_rejects_a_table_optimizer_without_a_cpu_kernel() -> None:
    with pytest.raises(MorecError, match="lamb"):
        shard(build_model("mf", 5, 7, 50), torch.device("cpu"), table_optimizer=EmbOptimType.LAMB)


# Training on the tiny synthetic profile


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    root = tmp_path_factory.mktemp("models") / "tiny"
    synthesize("tiny", root, PrepareConfig(seed=0))
    return PreparedDataset.open(root)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name, lr", [("mf", 1e-2), ("sasrec", 3e-3)])
def test_backbone_learns_the_tiny_dataset(tiny: PreparedDataset, name: str, lr: float) -> None:
    manifest = tiny.manifest
    torch.manual_seed(0)
    # SASRec reads the last 10 items (of up to 50): a quarter of the cost, same code.
    model = build_model(name, manifest["num_users"], manifest["num_items"], 10, embedding_dim=32)
    sampler = WeightedStreamSampler(tiny, [Accuracy()],
                                    SamplerConfig(objectives=("accuracy",), sub_batch_size=128))
    collate = Collator(model.feature_names, NegativeSampler(tiny.items()["train_count"].to_numpy()),
                       num_negatives(name), seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for epoch in range(12):
        sampler.set_epoch(epoch)
        for sampled in sampler:
            loss, _ = model(collate(sampled))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert len(losses) >= 250
    first, last = np.mean(losses[:25]), np.mean(losses[-25:])
    assert last < 0.85 * first, (first, last)


# Under DistributedModelParallel


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sharded_backbones_train_and_score_alike_on_every_rank(
        tiny: PreparedDataset, tmp_path: Path, nproc: int) -> None:
    run_torchrun("tests/dist/models_job.py", "--data", str(tiny.root), "--out", str(tmp_path),
                 nproc=nproc)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]
    assert set(ranks[0]) == {f"{m}/{s}" for m in ("mf", "sasrec")
                             for s in ("adam", "rowwise_adagrad")}
    for setup, first_rank in ranks[0].items():
        sharded = setup.endswith("rowwise_adagrad")  # Adam on CPU keeps tables unsharded
        for rank in ranks:
            result = rank[setup]
            assert result["sharded"] == result["pipelined"] == sharded
            losses = np.array(result["losses"])
            assert np.isfinite(losses).all()
            assert losses[-5:].mean() < losses[:5].mean() - 0.05, (setup, losses)
            assert result["scores"] == first_rank["scores"]
            # The callable ModelScorer gives the model's dot products for the same users.
            np.testing.assert_allclose(result["scorer"], result["scores"], rtol=1e-6, atol=1e-6)
        scores = np.array(first_rank["scores"])
        assert scores.shape == (8, tiny.manifest["num_items"]) and np.ptp(scores) > 0
