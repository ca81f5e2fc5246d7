"""Registry lookups fail closed: "does not exist" reads as None, an outage stops the gate and scoring.

A real SQLite registry (what runs locally) holds `two-tower` version 1 under `challenger`, no `champion`;
failures are injected into `MlflowClient`, the way an expired token, a 5xx or a timeout would surface.
"""
from __future__ import annotations

import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from recsys import gate, score
from recsys.config import load_config
from recsys.registry import CHALLENGER, CHAMPION, Registry, RegistryUnavailable

NAME = "two-tower"


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    config = load_config("tiny", [f"paths.data_dir={root}", f"mlflow.registered_model={NAME}"])
    client = config.mlflow_client()
    client.create_registered_model(NAME)
    version = client.create_model_version(NAME, str(root / "model"), run_id=None)
    client.set_registered_model_alias(NAME, CHALLENGER, version.version)
    return config


def failing_on(monkeypatch, alias: str, error: Exception) -> None:
    """`get_model_version_by_alias` raises `error` for `alias`, and answers as usual for any other."""
    real = MlflowClient.get_model_version_by_alias

    def lookup(self, name, wanted):
        if wanted == alias:
            raise error
        return real(self, name, wanted)

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", lookup)


OUTAGES = {
    "503": RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "service unavailable"}),
    "expired token": RestException({"error_code": "UNAUTHENTICATED", "message": "token expired"}),
    "no permission": RestException({"error_code": "PERMISSION_DENIED", "message": "no EXECUTE on the model"}),
    "5xx after retries": MlflowException("API request failed with exception HTTPSConnectionPool: Max retries"),
    "timeout": requests.exceptions.ReadTimeout("read timed out"),
}


def test_a_missing_alias_or_model_reads_as_none(config):
    registry = Registry.of(config)
    assert registry.alias_version(NAME, CHALLENGER) == "1"
    assert registry.alias(NAME, CHAMPION) is None          # the store says INVALID_PARAMETER_VALUE "not found"
    assert registry.alias("no-such-model", CHAMPION) is None  # RESOURCE_DOES_NOT_EXIST
    assert registry.aliases(NAME) == {CHALLENGER: "1"}
    with pytest.raises(LookupError, match="no version 7"):
        registry.version(NAME, 7)


def test_databricks_not_found_reads_as_none(config, monkeypatch):
    failing_on(monkeypatch, CHAMPION, RestException({"error_code": "NOT_FOUND", "message": "alias not found"}))
    assert Registry.of(config).alias(NAME, CHAMPION) is None


@pytest.mark.parametrize("outage", list(OUTAGES))
def test_an_outage_raises_naming_the_registry_and_the_alias(config, monkeypatch, outage):
    failing_on(monkeypatch, CHAMPION, OUTAGES[outage])
    with pytest.raises(RegistryUnavailable) as raised:
        Registry.of(config).alias(NAME, CHAMPION)
    message = str(raised.value)
    assert config.registry_uri in message and f"'{CHAMPION}' of '{NAME}'" in message
    assert raised.value.__cause__ is OUTAGES[outage]


def test_a_bad_argument_is_missing_only_when_the_model_has_no_such_alias(config, monkeypatch):
    """INVALID_PARAMETER_VALUE for an alias the registered model does list is not "not there"."""
    failing_on(monkeypatch, CHALLENGER, MlflowException("bad alias name", INVALID_PARAMETER_VALUE))
    with pytest.raises(RegistryUnavailable, match="INVALID_PARAMETER_VALUE"):
        Registry.of(config).alias(NAME, CHALLENGER)


def test_the_message_leaves_out_credentials():
    class Down:
        def get_model_version_by_alias(self, name, alias):
            raise OUTAGES["503"]

    with pytest.raises(RegistryUnavailable) as raised:
        Registry(Down(), "https://robot:s3cret@mlflow.example.com:5000").alias(NAME, CHAMPION)
    assert "s3cret" not in str(raised.value) and "https://mlflow.example.com:5000" in str(raised.value)


def test_the_gate_promotes_nothing_when_the_champion_lookup_fails(config, monkeypatch):
    failing_on(monkeypatch, CHAMPION, OUTAGES["expired token"])
    with pytest.raises(RegistryUnavailable):
        gate.promote_if_better(config, "1", {"map_at_12": 0.9}, None, {"popularity": {"map_at_12": 0.1}})
    monkeypatch.undo()
    assert Registry.of(config).alias(NAME, CHAMPION) is None
    assert "gate.decision" not in config.mlflow_client().get_model_version(NAME, "1").tags


def test_scoring_falls_back_to_the_challenger_only_when_there_is_no_champion(config, monkeypatch):
    assert score.resolve_model(config)[0] == f"models:/{NAME}@{CHALLENGER}"  # no champion yet
    failing_on(monkeypatch, CHAMPION, OUTAGES["503"])
    with pytest.raises(RegistryUnavailable, match="TEMPORARILY_UNAVAILABLE"):
        score.resolve_model(config)


def test_a_first_ranker_version_creates_the_model_but_an_outage_creates_nothing(config, monkeypatch):
    registry = Registry.of(config)
    registry.ensure_model("ranker")
    registry.ensure_model("ranker")  # already there: nothing to do
    assert registry.client.get_registered_model("ranker").name == "ranker"
    created = []

    def down(self, name):
        raise OUTAGES["503"]

    monkeypatch.setattr(MlflowClient, "get_registered_model", down)
    monkeypatch.setattr(MlflowClient, "create_registered_model", lambda self, name: created.append(name))
    with pytest.raises(RegistryUnavailable, match="'other-ranker'"):
        registry.ensure_model("other-ranker")
    assert created == []
