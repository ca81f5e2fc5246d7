"""`recsys serve` (recsys.serve) through FastAPI's TestClient: the API's answers and errors, and a publish during
serving that switches versions atomically (never a mix, the old version answering until the new one is loaded)."""
from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

import published_lake
import scoring_data as data
from recsys import lookup, publish, recommend, serve
from recsys.tables import Lakehouse

K = 12
STILL = "serving.refresh_seconds=3600"  # tests call Server.refresh themselves, unless they test the thread


@pytest.fixture(scope="module")
def lake_dir(spark, tmp_path_factory):
    return published_lake.build(spark, tmp_path_factory)


def client_for(lake_dir, *settings: str, server: serve.Server | None = None) -> TestClient:
    config = published_lake.config_for(lake_dir, STILL, *settings)
    return TestClient(serve.create_app(config, server or serve.Server(config)))


@pytest.fixture(scope="module", params=[True, False], ids=["in-memory", "row-groups"])
def api(lake_dir, request):
    with client_for(lake_dir, f"serving.preload={str(request.param).lower()}", "serving.max_batch=5") as client:
        yield client


def test_one_list_with_names_source_and_version(api, lake_dir):
    config = published_lake.config_for(lake_dir)
    latest = lookup.history(lookup.table_uri(config, "recommendations"))[-1]
    customer = data.CUSTOMER_IDS[5]
    response = api.get(f"/recommendations/{customer}")
    assert response.status_code == 200
    body = response.json()
    assert body["customer_id"] == customer and body["known"] is True and body["version"] == 1
    assert body["run_id"] == latest["run_id"] and body["model_version"] == "popularity@2020-09-22"
    assert body["generated_at"].endswith("Z")
    assert [i["rank"] for i in body["items"]] == list(range(1, K + 1))
    first = body["items"][0]
    assert first["article_id"] == data.ARTICLE_IDS[0] and first["prod_name"] == "Article 00"
    assert {"product_type_name", "colour_group_name", "index_group_name", "source", "score"} <= set(first)
    assert {i["source"] for i in body["items"]} <= set(recommend.SOURCES)
    assert len(api.get(f"/recommendations/{customer}?k=3").json()["items"]) == 3


def test_errors_are_clear(api):
    unknown = "e" * 64
    response = api.get(f"/recommendations/{unknown}")
    assert response.status_code == 404
    assert unknown in response.json()["detail"] and "version 1" in response.json()["detail"]
    response = api.get("/recommendations/not-a-customer")
    assert response.status_code == 422 and "malformed" in response.json()["detail"]
    assert api.get(f"/recommendations/{'A' * 64}").status_code == 422  # upper case is not an H&M id
    assert api.get(f"/recommendations/{data.CUSTOMER_IDS[0]}?k=0").status_code == 422
    assert api.get(f"/customers/{'x' * 3}/purchases").status_code == 422


def test_batch_answers_in_order_from_one_version(api):
    ids = [data.CUSTOMER_IDS[9], "e" * 64, data.CUSTOMER_IDS[1]]
    response = api.post("/recommendations/batch", json={"customer_ids": ids, "k": 4})
    assert response.status_code == 200
    body = response.json()
    assert body["version"] == 1 and body["missing"] == ["e" * 64]
    assert [r["customer_id"] for r in body["results"]] == [ids[0], ids[2]]
    assert all(len(r["items"]) == 4 and r["version"] == 1 for r in body["results"])
    too_many = api.post("/recommendations/batch", json={"customer_ids": data.CUSTOMER_IDS[:6]})
    assert too_many.status_code == 422  # serving.max_batch=5
    malformed = api.post("/recommendations/batch", json={"customer_ids": [data.CUSTOMER_IDS[0], "nope"]})
    assert malformed.status_code == 422 and "nope" in malformed.json()["detail"]
    assert api.post("/recommendations/batch", json={"customer_ids": []}).status_code == 422
    assert api.post("/recommendations/batch", json={}).status_code == 422


def test_health_version_examples_purchases_history(api):
    health = api.get("/health").json()
    assert health["status"] == "ok" and health["version"] == 1 and health["rows"] == len(data.CUSTOMER_IDS) * K
    version = api.get("/version").json()
    assert version["version"] == 1 and version["action"] == "publish" and version["articles_version"] == 0
    assert version["model_version"] == "popularity@2020-09-22" and version["table"].endswith("recommendations")
    examples = api.get("/customers/examples?n=3").json()["customer_ids"]
    assert examples and set(examples) <= set(data.CUSTOMER_IDS)
    customer = data.WITH_HISTORY[2]
    purchases = api.get(f"/customers/{customer}/purchases").json()["purchases"]
    expected = sorted((d.isoformat(), a) for d, c, a, _, _ in data.transactions_rows() if c == customer)
    assert sorted((p["t_dat"], p["article_id"]) for p in purchases) == expected
    assert all(p["prod_name"].startswith("Article") for p in purchases)
    commits = api.get("/history?format=json").json()
    assert [c["version"] for c in commits] == [0, 1] and commits[1]["run_id"] == version["run_id"]
    page = api.get("/history")
    assert page.status_code == 200 and version["run_id"] in page.text and 'class="served"' in page.text


def test_page_report_and_static_files(api, lake_dir):
    page = api.get("/")
    assert page.status_code == 200 and 'id="customer-id"' in page.text and "/static/app.js" in page.text
    assert api.get("/static/app.js").status_code == 200 and api.get("/static/style.css").status_code == 200
    report = serve.report_path(published_lake.config_for(lake_dir))
    missing = api.get("/report")
    assert missing.status_code == 404 and "no evaluation report" in missing.json()["detail"]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("<html><body>evaluation 2020-09-15</body></html>")
    try:
        assert "evaluation 2020-09-15" in api.get("/report").text
    finally:
        report.unlink()


def test_unknown_customers_can_get_the_best_sellers(lake_dir):
    with client_for(lake_dir, "serving.unknown_customer=popular") as api:
        body = api.get(f"/recommendations/{'e' * 64}").json()
        assert body["known"] is False and body["version"] == 1 and len(body["items"]) == K
        assert body["items"][0]["article_id"] == data.ARTICLE_IDS[0]  # everyone bought A00 the day before
        assert {i["source"] for i in body["items"]} == {"popularity_global"}
        known = api.get(f"/recommendations/{data.CUSTOMER_IDS[0]}").json()
        assert known["known"] is True
    with pytest.raises(ValueError, match="serving.unknown_customer must be one of"):
        serve.Server(published_lake.config_for(lake_dir, "serving.unknown_customer=guess"))


def test_worker_processes_rebuild_the_same_config(lake_dir, monkeypatch):
    """`serving.workers` > 1: each uvicorn process builds its app from the config its parent resolved."""
    from recsys.config import from_dict

    config = published_lake.config_for(lake_dir, STILL, "serving.workers=2", "serving.max_batch=7")
    assert from_dict(config.to_dict()) == config
    monkeypatch.setenv(serve.CONFIG_ENV, json.dumps(config.to_dict()))
    with TestClient(serve.app_from_environment()) as api:
        assert api.get("/health").json()["version"] == 1
        too_many = api.post("/recommendations/batch", json={"customer_ids": data.CUSTOMER_IDS[:8]})
        assert too_many.status_code == 422
    with pytest.raises(ValueError, match="serving.workers must be at least 1"):
        serve.run(published_lake.config_for(lake_dir, "serving.workers=0"))


def test_nothing_published_yet_is_a_503_not_a_crash(tmp_path):
    config = published_lake.config_for(tmp_path, STILL)
    with TestClient(serve.create_app(config)) as api:
        health = api.get("/health")
        assert health.status_code == 503 and "does not exist" in health.json()["reason"]
        assert api.get(f"/recommendations/{data.CUSTOMER_IDS[0]}").status_code == 503


class GatedLoad:
    """Opens versions like the server does, but holds the load of `gated_version` until released."""

    def __init__(self, gated_version: int):
        self.gated_version, self.entered, self.release = gated_version, threading.Event(), threading.Event()

    def __call__(self, uri: str, version: int) -> lookup.PublishedVersion:
        published = lookup.PublishedVersion(uri, version)
        if version == self.gated_version:
            self.entered.set()
            assert self.release.wait(60)
        return published


def test_a_publish_during_serving_switches_versions_atomically(spark, lake_dir, tmp_path):
    lake_dir = published_lake.copy_of(lake_dir, tmp_path)
    config = published_lake.config_for(lake_dir, STILL)
    gate = GatedLoad(gated_version=2)
    server = serve.Server(config, open_version=gate)
    with TestClient(serve.create_app(config, server)) as api:
        before = api.get("/version").json()
        assert before["version"] == 1
        # A new publish (Spark) while serving: the cut-off of version 0, under a new run.
        summary = recommend.run_popularity(Lakehouse(spark, config), cutoff="2020-09-19")
        assert summary["version"] == 2
        loader = threading.Thread(target=server.refresh)
        loader.start()
        assert gate.entered.wait(60)
        # Loading: every answer still comes whole from version 1.
        for customer in data.CUSTOMER_IDS[:10]:
            body = api.get(f"/recommendations/{customer}").json()
            assert (body["version"], body["run_id"]) == (1, before["run_id"])
        batch = api.post("/recommendations/batch", json={"customer_ids": data.CUSTOMER_IDS[:20]}).json()
        assert batch["version"] == 1 and {r["run_id"] for r in batch["results"]} == {before["run_id"]}
        gate.release.set()
        loader.join(60)
        after = api.get("/version").json()
        assert after["version"] == 2 and after["run_id"] == summary["run_id"] != before["run_id"]
        body = api.get(f"/recommendations/{data.CUSTOMER_IDS[0]}").json()
        assert (body["version"], body["run_id"]) == (2, summary["run_id"])
        assert body["model_version"] == "popularity@2020-09-19"
        # The rows are version 2's, not a mix: exactly what delta-rs reads at that version.
        expected = lookup.lists(lookup.PublishedVersion(server.uri, 2), None, [data.CUSTOMER_IDS[0]])
        assert [i["article_id"] for i in body["items"]] == \
            [i["article_id"] for i in expected[data.CUSTOMER_IDS[0]].items]
        # A rollback is a new commit too: the server follows it like a publish.
        rolled = publish.rollback(Lakehouse(spark, config))
        assert server.refresh() is True
        assert api.get("/version").json()["version"] == rolled["version"] == 3
        assert api.get(f"/recommendations/{data.CUSTOMER_IDS[0]}").json()["run_id"] == before["run_id"]


def test_the_server_follows_a_new_publish_without_a_restart(spark, lake_dir, tmp_path):
    lake_dir = published_lake.copy_of(lake_dir, tmp_path)
    config = published_lake.config_for(lake_dir, "serving.refresh_seconds=0.2")
    seen: list[tuple[int, str, str]] = []
    done = threading.Event()

    def ask_all_along(api: TestClient) -> None:  # requests before, during and after the publish
        while not done.is_set():
            body = api.get(f"/recommendations/{data.CUSTOMER_IDS[0]}").json()
            seen.append((body["version"], body["run_id"], body["model_version"]))
            done.wait(0.05)

    with TestClient(serve.create_app(config)) as api:
        before = api.get("/version").json()
        asking = threading.Thread(target=ask_all_along, args=(api,))
        asking.start()
        summary = recommend.run_popularity(Lakehouse(spark, config), cutoff="2020-09-19")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and api.get("/version").json()["version"] != 2:
            time.sleep(0.1)
        time.sleep(0.3)
        done.set()
        asking.join(10)
    assert seen[0][:2] == (1, before["run_id"]) and seen[-1][:2] == (2, summary["run_id"])
    # Versions only move forward, and each answer is wholly one version's: its run and its model.
    assert [v for v, _, _ in seen] == sorted(v for v, _, _ in seen)
    assert set(seen) == {(1, before["run_id"], "popularity@2020-09-22"),
                         (2, summary["run_id"], "popularity@2020-09-19")}
