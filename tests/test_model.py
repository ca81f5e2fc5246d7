"""Towers, feature batching, the scoring-side Encoder, and the loss/sampler pieces of training."""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recsys.model import Encoder, FeatureSpec, FeatureTable, TowerConfig, TwoTower
from recsys import trainer
from recsys.trainer import CatalogueSampler, FrequencySampler, SampledSoftmaxLoss, equal_pairs

torch.set_num_threads(2)


def customer_rows() -> pd.DataFrame:
    return pd.DataFrame({
        "customer_id": ["a", "b", "c"],
        "customer_idx": [1, 2, 3],
        "age_bucket": ["16-24", "25-34", "unknown"],  # not a model input: no cat_/num_ prefix
        "cat_club_status": [1, 2, 0],
        "cat_age_bucket": [1, 2, 6],
        "num_purchases_4w": [0.0, 2.0, 10.0],
        "num_price_mean": [0.02, 0.03, 0.04],
    })


def article_rows() -> pd.DataFrame:
    return pd.DataFrame({
        "article_id": ["0000000001", "0000000002", "0000000003", "0000000004"],
        "article_idx": [1, 2, 3, 4],
        "cat_product_type": [1, 1, 2, 3],
        "cat_colour_group": [4, 5, 4, 1],
        "num_sales_1w": [5.0, 0.0, 1.0, 3.0],
    })


@pytest.fixture()
def spec() -> FeatureSpec:
    return FeatureSpec.fit(customer_rows(), article_rows())


def test_spec_discovers_features_by_prefix_and_learns_statistics(spec):
    assert spec.customer.cat_columns == ["cat_age_bucket", "cat_club_status"]
    assert spec.customer.cat_sizes == [7, 3]
    assert spec.customer.num_columns == ["num_price_mean", "num_purchases_4w"]
    assert spec.customer.num_ids == 4 and spec.article.num_ids == 5
    assert spec.customer.num_mean[1] == pytest.approx(4.0)
    assert spec.customer.num_std[1] == pytest.approx(np.std([0.0, 2.0, 10.0]))
    assert FeatureSpec.from_dict(spec.to_dict()) == spec


def test_unknown_ids_codes_and_missing_values_map_to_the_unknown_row(spec):
    rows = pd.DataFrame({
        "customer_idx": [2, 99, -1, None],
        "cat_club_status": [2, 17, None, 1],
        "num_purchases_4w": [4.0, None, np.inf, 1e9],
        # cat_age_bucket and num_price_mean missing entirely: unknown code / the training mean
    })
    t = spec.customer.tensors(rows)
    assert t["id"].tolist() == [2, 0, 0, 0]
    assert t["cat"][:, 1].tolist() == [2, 0, 0, 1] and t["cat"][:, 0].tolist() == [0, 0, 0, 0]
    assert t["num"][:, 0].abs().max() == 0  # the mean, standardised
    assert t["num"][0, 1] == pytest.approx(0.0) and t["num"][1, 1] == 0 and t["num"][2, 1] == 0
    assert t["num"][3, 1] == pytest.approx(5.0)  # clipped, one outlier cannot blow up a batch


def test_feature_table_is_indexed_by_idx_with_row_zero_unknown(spec):
    table = FeatureTable(spec.article, article_rows().iloc[::-1])  # order of the rows must not matter
    batch = table.batch(torch.tensor([3, 0, 42]))
    assert batch["id"].tolist() == [3, 0, 0]
    assert batch["cat"][0].tolist() == [4, 2]  # cat_colour_group, cat_product_type of article 3
    assert batch["cat"][1].tolist() == [0, 0] and batch["num"][1].abs().sum() == 0


def test_towers_give_unit_vectors_and_encoder_matches_training_code(spec):
    torch.manual_seed(0)
    model = TwoTower(spec, TowerConfig(id_dim=4, attribute_dim=3, hidden_dim=8, output_dim=6)).eval()
    customers = FeatureTable(spec.customer, customer_rows())
    with torch.no_grad():
        users = model.user_embedding(customers.batch(torch.tensor([1, 2, 3])))
    assert users.shape == (3, 6)
    assert torch.allclose(users.norm(dim=1), torch.ones(3), atol=1e-5)

    encoder = pickle.loads(pickle.dumps(Encoder.from_model(model, as_of="2020-09-22", model_version="3")))
    assert encoder.dim == 6 and encoder.as_of == "2020-09-22" and encoder.model_version == "3"
    encoded = encoder.encode_customers(customer_rows())
    assert encoded.dtype == np.float32 and np.allclose(encoded, users.numpy(), atol=1e-6)
    articles = encoder.encode_articles(pd.DataFrame({"article_idx": [1, 1000], "cat_product_type": [1, 99]}))
    assert articles.shape == (2, 6) and np.allclose(np.linalg.norm(articles, axis=1), 1.0, atol=1e-5)


def test_encoder_round_trips_through_a_file(spec, tmp_path):
    model = TwoTower(spec, TowerConfig(id_dim=4, attribute_dim=3, hidden_dim=8, output_dim=6))
    encoder = Encoder.from_model(model, as_of="2020-09-22")
    encoder.save(tmp_path / "encoder.pt")
    again = Encoder.load(tmp_path / "encoder.pt")
    assert np.array_equal(again.encode_articles(article_rows()), encoder.encode_articles(article_rows()))


# --- loss and sampler ------------------------------------------------------------------------------------
def _embeddings(n: int, d: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_a_positive_twice_in_the_batch_is_never_its_own_negative():
    loss = SampledSoftmaxLoss(temperature=0.1)
    customers = torch.tensor([1, 2, 3, 3])
    articles = torch.tensor([7, 7, 8, 9])  # article 7 twice; customer 3 twice
    negatives = torch.tensor([7, 5])
    logits = loss.logits(_embeddings(4), _embeddings(4, seed=1), customers, articles, _embeddings(2, seed=2), negatives)
    assert logits.shape == (4, 6)
    assert torch.isinf(logits[0, 1]) and torch.isinf(logits[1, 0])      # same article, other row
    assert torch.isinf(logits[2, 3]) and torch.isinf(logits[3, 2])      # the same customer's other purchase
    assert torch.isinf(logits[0, 4]) and torch.isinf(logits[1, 4])      # a sampled negative equal to the positive
    assert torch.isfinite(logits.diagonal()).all()                      # the true candidate always stays
    assert torch.isfinite(logits[2, 4]) and torch.isfinite(logits[0, 2])
    masked = int(torch.isinf(logits).sum())
    assert masked == 6


def test_log_q_correction_lowers_each_candidate_by_its_sampling_log_rate():
    loss = SampledSoftmaxLoss(temperature=0.5)
    users, items, negatives = _embeddings(3), _embeddings(3, seed=1), _embeddings(2, seed=2)
    customers, articles, negative_idx = torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3]), torch.tensor([4, 5])
    counts = np.array([0, 60, 30, 9, 1, 0])
    in_batch, catalogue = FrequencySampler(counts), CatalogueSampler(num_ids=6)
    plain = loss.logits(users, items, customers, articles, negatives, negative_idx)
    corrected = loss.logits(users, items, customers, articles, negatives, negative_idx,
                            positive_log_q=in_batch.log_q(articles, 3), negative_log_q=catalogue.log_q(negative_idx, 2))
    expected_q = torch.tensor([math.log(3 * 0.6), math.log(3 * 0.3), math.log(3 * 0.09)])
    assert torch.allclose(plain[:, :3] - corrected[:, :3], expected_q.expand(3, 3), atol=1e-5)
    assert torch.allclose(plain[:, 3:] - corrected[:, 3:], torch.full((3, 2), math.log(2 / 5)), atol=1e-5)
    # the best seller's logit drops most: the loss no longer pushes popular articles away harder than rare ones
    drops = (plain - corrected)[0, :3]
    assert drops[0] > drops[1] > drops[2]


def test_loss_is_weighted_and_prefers_the_true_pairs():
    loss = SampledSoftmaxLoss(temperature=0.1)
    items = _embeddings(4)
    args = dict(customer_idx=torch.arange(4), article_idx=torch.arange(1, 5))
    aligned = loss(torch.ones(4), user=items, positives=items, **args)
    shuffled = loss(torch.ones(4), user=items.roll(1, dims=0), positives=items, **args)
    assert aligned < shuffled
    only_first = loss(torch.tensor([1.0, 0, 0, 0]), user=items.roll(1, dims=0), positives=items, **args)
    first = loss.logits(items.roll(1, dims=0), items, **args)[0].log_softmax(0)[0]
    assert only_first == pytest.approx(float(-first), rel=1e-5)


def test_samplers_never_draw_the_unknown_row_and_follow_their_law():
    g = torch.Generator().manual_seed(0)
    drawn = CatalogueSampler(num_ids=5).sample(4000, g)
    assert drawn.min() >= 1 and drawn.max() <= 4 and len(drawn.unique()) == 4
    drawn = FrequencySampler(np.array([100, 3, 1, 0])).sample(4000, g)
    assert set(drawn.tolist()) <= {1, 2}
    assert 0.7 < float((drawn == 1).float().mean()) < 0.8  # 3:1


# --- the customer's history in the customer tower ---------------------------------------------------------
def _with_history(rows: pd.DataFrame, sequences: list[list[int]]) -> pd.DataFrame:
    return rows.assign(seq_article_idx=sequences, seq_days_before=[[1] * len(s) for s in sequences])


def test_history_gives_an_unseen_customer_a_personal_vector_from_shared_article_embeddings():
    customers = _with_history(customer_rows(), [[1, 2, 0], [3, 0, 0], [0, 0, 0]])
    articles = article_rows().assign(cat_product_code=[1, 1, 2, 3])  # articles 1 and 2: one product, two colours
    spec = FeatureSpec.fit(customers, articles)
    assert spec.customer.seq_length == 3 and spec.article.num_columns == []  # no leaky sales numbers
    torch.manual_seed(0)
    table = FeatureTable(spec.article, articles)
    from recsys.model import article_products

    model = TwoTower(spec, TowerConfig(id_dim=4, attribute_dim=3, hidden_dim=8, output_dim=6, customer_id=False),
                     article_products(spec, table)).eval()
    pooling = model.customer_tower.history
    assert pooling.article_ids is model.article_tower.id_embedding  # shared, not copied
    assert model.customer_tower.id_embedding is None
    assert pooling.article_product.tolist() == [0, 1, 1, 2, 3]
    strangers = _with_history(customer_rows().assign(customer_idx=[999, 999, 999]), [[1, 0, 0], [3, 0, 0], [0, 0, 0]])
    encoder = Encoder.from_model(model, as_of="2020-09-22")
    vectors = encoder.encode_customers(strangers)
    assert not np.allclose(vectors[0], vectors[1])  # same unknown id, different histories: different vectors
    # the pooled input is the article tower's own embeddings: changing article 1's embedding moves customer 0 only
    with torch.no_grad():
        model.article_tower.id_embedding.weight[1] += 1.0
    moved = Encoder.from_model(model, as_of="2020-09-22").encode_customers(strangers)
    assert not np.allclose(moved[0], vectors[0]) and np.allclose(moved[1], vectors[1], atol=1e-6)
    # a saved model rebuilds the same product table from its state
    again = pickle.loads(pickle.dumps(encoder))
    assert np.allclose(again.encode_customers(strangers), vectors, atol=1e-6)


def test_history_pooling_weights_recent_articles_and_ignores_padding():
    from recsys.model import HistoryPooling

    ids = torch.nn.Embedding(4, 2)
    with torch.no_grad():
        ids.weight.copy_(torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]))
    pooling = HistoryPooling(3, ids, None, torch.zeros(4, dtype=torch.long))
    with torch.no_grad():
        pooling.rate.fill_(5.0)  # strong recency
        out = pooling(torch.tensor([[1, 2, 0], [0, 0, 0]]), torch.tensor([[0.0, 70.0, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.allclose(out[0], torch.tensor([1.0, 0.0]), atol=1e-3)  # the older article barely counts
    assert torch.equal(out[1], torch.zeros(2))  # padding only: nothing, not the unknown row's embedding


def test_equal_pairs_are_every_equal_pair_of_the_broadcast_comparison():
    g = torch.Generator().manual_seed(5)
    for n, m, high in ((50, 70, 6), (200, 30, 400), (1, 1, 1), (0, 5, 3), (5, 0, 3)):
        left, right = torch.randint(0, high, (n,), generator=g), torch.randint(0, high, (m,), generator=g)
        rows, columns = equal_pairs(left, right)
        want = torch.nonzero(left[:, None] == right[None, :])
        assert sorted(zip(rows.tolist(), columns.tolist())) == sorted(map(tuple, want.tolist()))


def test_the_folded_logits_and_their_gradients_are_the_plain_formula():
    """The loss folds the temperature and log-Q into one product: the logits and the gradients reaching the towers
    must be those of the formula written out (scale, subtract log-Q, mask, per block)."""
    g = torch.Generator().manual_seed(3)
    b, m, d, t = 16, 8, 6, 0.2
    customers, articles = torch.randint(0, 6, (b,), generator=g), torch.randint(1, 9, (b,), generator=g)
    negative_idx = torch.randint(1, 9, (m,), generator=g)
    q_pos, q_neg = torch.rand(b, generator=g).log(), torch.rand(m, generator=g).log()
    weight = torch.rand(b, generator=g)

    def leaves():
        return [torch.randn(n, d, generator=torch.Generator().manual_seed(s)).requires_grad_() for n, s in
                ((b, 0), (b, 1), (m, 2))]

    user, pos, neg = leaves()
    loss = SampledSoftmaxLoss(temperature=t)
    folded = loss.logits(user, pos, customers, articles, neg, negative_idx, q_pos, q_neg)
    loss(weight, user=user, positives=pos, customer_idx=customers, article_idx=articles, negatives=neg,
         negative_idx=negative_idx, positive_log_q=q_pos, negative_log_q=q_neg).backward()

    user2, pos2, neg2 = leaves()
    inner = (user2 @ pos2.T / t - q_pos[None, :])
    mask = (articles[:, None] == articles[None, :]) | (customers[:, None] == customers[None, :])
    mask.fill_diagonal_(False)
    plain = torch.cat([inner.masked_fill(mask, float("-inf")),
                       (user2 @ neg2.T / t - q_neg[None, :]).masked_fill(negative_idx[None, :] == articles[:, None],
                                                                         float("-inf"))], dim=1)
    per = torch.nn.functional.cross_entropy(plain, torch.arange(b), reduction="none")
    ((per * weight).sum() / weight.sum()).backward()
    assert torch.isinf(plain).sum() > 0 and torch.equal(torch.isinf(folded), torch.isinf(plain))
    assert torch.allclose(folded[torch.isfinite(folded)], plain[torch.isfinite(plain)], atol=1e-5)
    for got, want in ((user, user2), (pos, pos2), (neg, neg2)):
        assert torch.allclose(got.grad, want.grad, atol=1e-5)


HEAP_PROBE = """
import json, resource, torch
from recsys import trainer

def faults(times=6, megabytes=96):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        buffer = torch.ones(megabytes * 2**20 // 4)  # torch's CPU allocator: malloc, small pages
        del buffer
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1])  # pages

outside = faults()
with trainer.reused_heap():
    faults()  # the heap grows to what the buffers need
    inside = faults()
    resident_inside = resident()
resident_after = resident()
print(json.dumps({"outside": outside, "inside": inside, "after": faults(),
                  "given_back": resident_inside - resident_after}))
"""


@pytest.mark.skipif(trainer._glibc() is None, reason="the heap settings are glibc's")
def test_training_reuses_the_heap_for_large_buffers_and_gives_it_back_after():
    """Each freed big buffer is unmapped by default, so the next one faults in fresh pages; while training,
    once the heap has grown to what the buffers need, the same memory is reused. Measured in a fresh
    interpreter: this one's heap holds whatever the tests before left in it."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    faults = json.loads(done.stdout.splitlines()[-1])
    one_buffer = 96 * 2**20 // 4096
    assert faults["outside"] >= 5 * one_buffer  # glibc's default: every big buffer is a fresh mapping
    assert faults["inside"] <= one_buffer
    # on leaving, the heap the buffers grew is handed back and later buffers fault their pages in again
    assert faults["given_back"] >= 0.9 * one_buffer and faults["after"] >= one_buffer
