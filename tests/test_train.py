"""The trainer end to end on generated data with planted taste, plus loader, resume and input checks.

The planted-taste world: customers belong to one of four taste groups and buy mostly from their group's
articles (skewed within the group), sometimes from a small set of best sellers. Global popularity can only
recommend the best sellers and a mix of groups; a model that learned the taste must beat it clearly on a
week it never saw. An untrained model of the same shape must not: so the test goes red when learning breaks.
"""
from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest
import torch

from recsys import trainer
from recsys import metrics, train
from recsys.loader import MemoryLoader, PetastormLoader
from recsys.model import Encoder, SideSpec, TwoTower, article_products, load_encoder, tower_config
from recsys.tables import (
    ARTICLE_FEATURES, ARTICLE_INDEX, CUSTOMER_FEATURES, CUSTOMER_INDEX, TRAINING_EXAMPLES,
)

torch.set_num_threads(2)
AS_OF = date(2020, 9, 1)
GROUPS, PER_GROUP, POPULAR = 4, 10, 4
HISTORY = 5


def planted_taste(n_customers: int = 240, purchases: int = 12, test_purchases: int = 3, days: int = 42,
                  seed: int = 0) -> dict[str, pd.DataFrame]:
    """Feature-store-shaped pandas tables (the contract's columns) + the purchases of the week after AS_OF."""
    rng = np.random.default_rng(seed)
    article_group = np.array([-1] * POPULAR + [g for g in range(GROUPS) for _ in range(PER_GROUP)])
    n_articles = len(article_group)
    within = 1.0 / np.arange(1, PER_GROUP + 1) ** 0.7
    within /= within.sum()

    def buy(group: int) -> int:
        if rng.random() < 0.3:
            return int(rng.integers(0, POPULAR))
        return POPULAR + group * PER_GROUP + int(rng.choice(PER_GROUP, p=within))

    rows, test_rows = [], []
    for c in range(n_customers):
        group = c % GROUPS
        for _ in range(purchases):
            rows.append((c, buy(group), AS_OF - timedelta(days=int(rng.integers(1, days + 1)))))
        for _ in range(test_purchases):
            test_rows.append((c, buy(group), AS_OF + timedelta(days=int(rng.integers(0, 7)))))
    customer_id = [f"{c:064x}" for c in range(n_customers)]
    article_id = [f"{a + 108775015:010d}" for a in range(n_articles)]
    history = pd.DataFrame(rows, columns=["c", "a", "t_dat"])
    days_before = history["t_dat"].map(lambda d: (AS_OF - d).days)
    feature_as_of = [AS_OF - timedelta(days=7 * -(-d // 7)) for d in days_before]  # the start of its week

    def sequence(c: int, cut: date) -> list[int]:
        """The customer's articles (article_idx) bought before `cut`, most recent first: the history input."""
        past = history[(history["c"] == c) & (history["t_dat"] < cut)].sort_values("t_dat", ascending=False)
        return (past["a"].drop_duplicates() + 1).head(HISTORY).tolist()

    def padded(values: list[int]) -> list[int]:
        return values + [0] * (HISTORY - len(values))

    share = pd.crosstab(history["c"], article_group[history["a"]] + 1, normalize="index")
    customers = pd.DataFrame({
        "customer_id": customer_id, "customer_idx": np.arange(1, n_customers + 1, dtype="int32"), "as_of": AS_OF,
        "has_history": np.ones(n_customers, dtype="int32"), "age": rng.integers(18, 70, n_customers).astype("int32"),
        "age_bucket": "25-34", "cat_age_bucket": rng.integers(1, 6, n_customers).astype("int32"),
        "cat_club_status": rng.integers(1, 4, n_customers).astype("int32"),
        "cat_news_frequency": rng.integers(1, 3, n_customers).astype("int32"),
        "cat_fn": rng.integers(0, 2, n_customers).astype("int32"),
        "cat_active": rng.integers(0, 2, n_customers).astype("int32"),
        "num_purchases_all": history.groupby("c").size().reindex(range(n_customers), fill_value=0).astype(float).values,
        **{f"num_share_index_group_{g}": share.get(g + 1, pd.Series(0.0, index=share.index))
           .reindex(range(n_customers), fill_value=0.0).values for g in range(GROUPS)},
        "seq_article_idx": [padded(sequence(c, AS_OF)) for c in range(n_customers)],
        "seq_days_before": [[0] * HISTORY for _ in range(n_customers)],
    })
    # Point-in-time rows: the profile, and the history as of the start of the example's week (never the example).
    state = customers.set_index("customer_idx")[[c for c in customers.columns if c.startswith("cat_")]]
    examples = pd.DataFrame({
        "as_of": AS_OF, "customer_id": [customer_id[c] for c in history["c"]],
        "article_id": [article_id[a] for a in history["a"]], "customer_idx": (history["c"] + 1).astype("int32"),
        "article_idx": (history["a"] + 1).astype("int32"), "t_dat": history["t_dat"],
        "weight": 0.5 ** ((days_before - 1) / 14.0), "days_before": days_before.astype("int32"),
        "feature_as_of": feature_as_of,
    })
    examples = examples.join(state, on="customer_idx")
    examples["num_purchases_all"] = [float(((history["c"] == c) & (history["t_dat"] < cut)).sum())
                                     for c, cut in zip(history["c"], feature_as_of)]
    examples["seq_article_idx"] = [padded(sequence(c, cut)) for c, cut in zip(history["c"], feature_as_of)]
    examples["seq_days_before"] = [[0] * HISTORY for _ in range(len(examples))]
    sales = history.groupby("a").size().reindex(range(n_articles), fill_value=0)
    articles = pd.DataFrame({
        "article_id": article_id, "article_idx": np.arange(1, n_articles + 1, dtype="int32"), "as_of": AS_OF,
        "cat_index_group": (article_group + 2).astype("int32"),
        "cat_product_type": rng.integers(1, 8, n_articles).astype("int32"),
        "cat_colour_group": rng.integers(1, 12, n_articles).astype("int32"),
        "num_sales_4w": sales.astype(float).values, "num_price_mean": rng.uniform(0.01, 0.05, n_articles),
    })
    test = pd.DataFrame({"customer_id": [customer_id[c] for c, _, _ in test_rows],
                         "article_id": [article_id[a] for _, a, _ in test_rows]})
    return {"customers": customers, "articles": articles, "examples": examples, "test": test}


def write_world(lake, world) -> None:
    spark = lake.spark
    lake.write(spark.createDataFrame(world["customers"]), CUSTOMER_FEATURES, partition_by=["as_of"])
    lake.write(spark.createDataFrame(world["articles"]), ARTICLE_FEATURES, partition_by=["as_of"])
    lake.write(spark.createDataFrame(world["examples"]), TRAINING_EXAMPLES, partition_by=["as_of"])
    lake.write(spark.createDataFrame(world["customers"][["customer_id", "customer_idx"]]), CUSTOMER_INDEX)
    lake.write(spark.createDataFrame(world["articles"][["article_id", "article_idx"]]), ARTICLE_INDEX)


def configure(lake, tmp_path, **model):
    lake.config.paths.checkpoint_dir = str(tmp_path / "checkpoints")
    lake.config.mlflow.experiment = "test-train"
    settings = dict(epochs=8, batch_size=128, negatives=32, learning_rate=0.01, patience=3, loader="petastorm",
                    embedding_dim=16, id_embedding_dim=8, attribute_embedding_dim=4, hidden_dim=32)
    for key, value in {**settings, **model}.items():
        setattr(lake.config.model, key, value)


def recommend(encoder: Encoder, world, k: int = 12) -> dict[str, list[str]]:
    users = encoder.encode_customers(world["customers"])
    items = encoder.encode_articles(world["articles"])
    best = np.argsort(-(users @ items.T), axis=1, kind="stable")[:, :k]
    ids = world["articles"]["article_id"].to_numpy()
    return dict(zip(world["customers"]["customer_id"], ids[best].tolist()))


@pytest.fixture(scope="module")
def world():
    return planted_taste()


def test_two_tower_beats_popularity_on_a_week_it_never_saw(lake, tmp_path, world, capsys):
    write_world(lake, world)
    configure(lake, tmp_path)
    result = train.run(lake, as_of=None)

    assert result["as_of"] == AS_OF.isoformat() and result["model_version"] == "1"
    printed = capsys.readouterr().out
    assert result["run_id"] in printed and "mlflow ui --backend-store-uri sqlite:///" in printed
    encoder = load_encoder(result["model_uri"], tracking_uri=lake.config.tracking_uri)
    assert encoder.model_version == "1" and encoder.as_of == AS_OF.isoformat()

    truth = metrics.purchases_by_customer(world["test"].itertuples(index=False))
    best_sellers = world["examples"]["article_id"].value_counts().index[:12].tolist()
    popularity = metrics.evaluate({c: best_sellers for c in truth}, truth, [12])["recall_at_12"]
    trained = metrics.evaluate(recommend(encoder, world), truth, [12])["recall_at_12"]
    untrained_model = TwoTower(encoder.spec, encoder.tower)
    untrained_encoder = Encoder.from_model(untrained_model, "x")
    untrained = metrics.evaluate(recommend(untrained_encoder, world), truth, [12])["recall_at_12"]
    assert trained > popularity + 0.15, (trained, popularity)
    assert untrained < popularity, (untrained, popularity)  # the bar is not trivially cleared
    # the trainer's own validation (held-out last week before as_of) saw the same picture
    assert result["metrics"]["val_recall_at_12"] > result["metrics"]["val_popularity_recall_at_12"]

    import mlflow

    client = mlflow.MlflowClient()
    run = client.get_run(result["run_id"])
    assert run.data.params["feature_as_of"] == AS_OF.isoformat()
    assert len(client.get_metric_history(result["run_id"], "val_map_at_12")) == result["metrics"]["epochs_run"]
    logged = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"config.json", "embeddings", "id_maps", "feature_spec.json"} <= logged
    version = client.get_model_version_by_alias(lake.config.mlflow.registered_model, "challenger")
    assert str(version.version) == "1" and version.run_id == result["run_id"]
    pyfunc = mlflow.pyfunc.load_model(result["model_uri"])
    assert pyfunc.metadata.signature is not None
    out = pyfunc.predict(world["articles"].drop(columns=["as_of", "article_id"]), params={"tower": "article"})
    assert np.allclose(out, encoder.encode_articles(world["articles"]), atol=1e-6)


def _in_memory(world, validation_days: int = 7):
    ex = world["examples"]
    held = ex["t_dat"] >= AS_OF - timedelta(days=validation_days)
    counts = ex[~held].groupby("article_idx").size().rename("count").reset_index()
    state = [c for c in ex.columns if c.startswith(("cat_", "num_", "seq_"))]
    spec = SideSpec.fit(ex[["customer_idx", *state]], "customer_idx")
    validation_customers = ex[held].sort_values(["feature_as_of", "t_dat"]).drop_duplicates("customer_idx")
    data = trainer.TrainingData.build(spec, world["articles"], counts, ex[held], validation_customers[
        ["customer_idx", *state]], AS_OF.isoformat())
    return data, ex[~held]


def memory_loader(rows: pd.DataFrame, mc) -> MemoryLoader:
    """The training rows as the trainer streams them: ids, weight and the customer state columns."""
    arrays = {c: (np.stack(rows[c].map(np.asarray).to_numpy()) if c.startswith("seq_") else rows[c].to_numpy())
              for c in rows.columns if c in ("customer_idx", "article_idx", "weight") or c.startswith(
                  ("cat_", "num_", "seq_"))}
    return MemoryLoader(arrays, mc.batch_size, mc.seed)


def two_tower(data, mc) -> TwoTower:
    """Seeded: the same first weights whatever ran before in this process (a test's outcome must not depend on
    the order pytest-xdist happens to give its worker)."""
    torch.manual_seed(mc.seed)
    return TwoTower(data.spec, tower_config(mc), article_products(data.spec, data.articles))


def test_resume_after_interruption_reaches_the_same_weights(lake, tmp_path, world):
    configure(lake, tmp_path, epochs=3, patience=10, loader="memory")
    mc = lake.config.model
    data, rows = _in_memory(world)

    def fresh():
        return two_tower(data, mc), memory_loader(rows, mc)

    model, loader = fresh()
    straight = trainer.fit(model, loader, data, mc, checkpoint=tmp_path / "a.pt")

    class Interrupted(Exception):
        pass

    def crash_after_first(epoch, row):
        if epoch == 0:
            raise Interrupted

    model_b, loader_b = fresh()
    with pytest.raises(Interrupted):
        trainer.fit(model_b, loader_b, data, mc, checkpoint=tmp_path / "b.pt", on_epoch_end=crash_after_first)
    model_b, loader_b = fresh()  # a new process: nothing survives but the checkpoint
    resumed = trainer.fit(model_b, loader_b, data, mc, checkpoint=tmp_path / "b.pt")

    assert resumed.resumed_from == 1 and straight.resumed_from == 0
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    for (name, a), (_, b) in zip(model.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name


def test_sparse_id_updates_touch_only_the_ids_of_the_batches_and_resume(lake, tmp_path, world):
    configure(lake, tmp_path, epochs=2, patience=10, loader="memory", sparse_ids=True, weight_decay=1e-2)
    mc = lake.config.model
    data, rows = _in_memory(world)
    seen = sorted({int(i) for i in rows["customer_idx"]})

    def trained(sparse: bool, checkpoint=None, on_epoch_end=None):
        mc.sparse_ids = sparse
        model = two_tower(data, mc)
        start = model.customer_tower.id_embedding.weight.detach().clone()
        result = trainer.fit(model, memory_loader(rows, mc), data, mc, checkpoint=checkpoint,
                             on_epoch_end=on_epoch_end)
        return model, start, result

    model, start, result = trained(True, tmp_path / "s.pt")
    after = model.customer_tower.id_embedding.weight.detach()
    unseen = [i for i in range(len(start)) if i not in set(seen)]
    assert unseen and torch.equal(after[unseen], start[unseen])  # ids no batch held: not touched
    assert not torch.allclose(after[seen], start[seen])
    assert all(np.isfinite(r["loss"]) for r in result.history) and result.history[-1]["val_map_at_12"] >= 0
    dense, dense_start, _ = trained(False)
    moved = dense.customer_tower.id_embedding.weight.detach()
    assert not torch.allclose(moved[unseen], dense_start[unseen])  # dense Adam's weight decay moves every row

    def stop_after_first(epoch, row):
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trained(True, tmp_path / "r.pt", stop_after_first)
    resumed, _, again = trained(True, tmp_path / "r.pt")  # both optimizers' state comes back from the checkpoint
    assert again.resumed_from == 1 and [r["loss"] for r in again.history] == [r["loss"] for r in result.history]
    with pytest.raises(ValueError, match="sparse_ids"):
        trained(False, tmp_path / "r.pt")


def test_early_stopping_keeps_the_best_epoch(lake, tmp_path, world):
    configure(lake, tmp_path, epochs=12, patience=1, loader="memory", learning_rate=0.05)
    mc = lake.config.model
    data, rows = _in_memory(world)
    loader = memory_loader(rows, mc)
    model = two_tower(data, mc)
    result = trainer.fit(model, loader, data, mc)
    assert result.stopped_early and len(result.history) < 12
    maps = [r["val_map_at_12"] for r in result.history]
    assert result.best_metric == max(maps) and maps[result.best_epoch] == max(maps)
    assert trainer.validate(model, data)["val_map_at_12"] == pytest.approx(max(maps))  # best weights restored


def test_loaders_yield_every_training_row_once_per_epoch(lake, tmp_path):
    n = 5003
    pdf = pd.DataFrame({"customer_idx": np.arange(n, dtype="int32") % 97, "article_idx": np.arange(n, dtype="int32"),
                        "weight": np.linspace(0.1, 1.0, n), "t_dat": date(2020, 9, 1)})
    pdf["seq_article_idx"] = [[i, i + 1, 0] for i in range(n)]  # a history array: must stay with its row
    lake.write(lake.spark.createDataFrame(pdf), "probe_examples")
    df = lake.read("probe_examples")

    petastorm = PetastormLoader(df, batch_size=512, cache_dir=tmp_path / "cache", seed=3, columns=["seq_article_idx"])
    memory = MemoryLoader.from_dataframe(df, batch_size=512, seed=3, columns=["seq_article_idx"])
    try:
        assert petastorm.num_rows == memory.num_rows == n
        for loader in (petastorm, memory):
            orders = []
            for epoch in range(2):
                batches = list(loader.epoch(epoch))
                seen = torch.cat([b["article_idx"] for b in batches])
                assert sorted(seen.tolist()) == list(range(n)), type(loader).__name__
                assert max(len(b["weight"]) for b in batches) == 512
                assert batches[0]["article_idx"].dtype == torch.int64 and batches[0]["weight"].dtype == torch.float32
                for b in batches:  # every column of a row shuffled together
                    assert b["seq_article_idx"].shape == (len(b["article_idx"]), 3)
                    assert torch.equal(b["seq_article_idx"][:, 0], b["article_idx"])
                    assert torch.equal(b["seq_article_idx"][:, 1], b["article_idx"] + 1)
                weights = dict(zip(seen.tolist(), torch.cat([b["weight"] for b in batches]).tolist()))
                assert weights[n - 1] == pytest.approx(1.0) and weights[0] == pytest.approx(0.1)
                orders.append(seen.tolist())
            assert orders[0] != orders[1]  # reshuffled between epochs
        # one reader thread: the same seed and epoch give the same order, run after run, with either buffer
        again = PetastormLoader(df, batch_size=512, cache_dir=tmp_path / "again", seed=3, workers=1,
                                columns=["seq_article_idx"])
        try:
            for tensor_batches in (False, True):
                again.tensor_batches = tensor_batches
                runs = [list(again.epoch(0)) for _ in range(2)]
                orders = [torch.cat([b["article_idx"] for b in run]).tolist() for run in runs]
                assert orders[0] == orders[1] and sorted(orders[0]) == list(range(n))
                for b in runs[0]:
                    assert torch.equal(b["seq_article_idx"][:, 0], b["article_idx"])
        finally:
            again.close()
        shards = [torch.cat([b["article_idx"] for b in memory.shard(r, 2).epoch(0)]).tolist() for r in range(2)]
        assert sorted(shards[0] + shards[1]) == list(range(n)) and not set(shards[0]) & set(shards[1])
    finally:
        petastorm.close()


def test_bad_training_rows_are_named(lake, tmp_path, world):
    small = {k: v.head(40) if k == "examples" else v for k, v in world.items()}
    small["examples"] = small["examples"].assign(weight=[None] + [1.0] * 39)
    write_world(lake, small)
    configure(lake, tmp_path)
    with pytest.raises(ValueError, match=r"training_examples.*1 row\(s\) with null 'weight'"):
        train.run(lake, as_of=AS_OF.isoformat())
    with pytest.raises(ValueError, match=r"article_features.*2020-08-01"):
        train.run(lake, as_of="2020-08-01")


def test_torch_distributor_trains_two_local_processes_on_shards(lake, tmp_path, world):
    configure(lake, tmp_path, epochs=2, loader="memory", distributed_processes=2)
    mc = lake.config.model
    data, rows = _in_memory(world)
    loader = memory_loader(rows, mc)
    model = two_tower(data, mc)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    untrained = trainer.validate(model, data)["val_recall_at_12"]
    result = trainer.fit_distributed(model, loader, data, mc, checkpoint=tmp_path / "dist.pt")
    assert [r["examples"] for r in result.history] == [(len(rows) + 1) // 2] * 2  # rank 0: its half
    id_embedding = "article_tower.id_embedding.weight"
    assert not torch.equal(before[id_embedding], model.state_dict()[id_embedding])
    # it learned: the loss fell and the held-out week is found far better than by the first weights (against
    # popularity, two short epochs on half the rows each land within a few thousandths of it either way)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.history[-1]["val_recall_at_12"] > untrained + 0.1
    assert trainer.read_checkpoint(tmp_path / "dist.pt")["state"]["epoch"] == 2
