"""The model registry, read one way: "does not exist" is an answer, any other failure stops the stage.

The gate promotes a challenger when there is no champion, and scoring publishes what the aliases point to. If
an expired token, a 5xx or a timeout read as "no champion", an ungated model would be promoted and published.
So every alias and version lookup goes through `Registry`: only MLflow's "does not exist" reads as "not
there" (None); anything else raises `RegistryUnavailable`, naming the registry and the lookup, before the
stage decides or publishes anything.

What "does not exist" looks like, by registry:
- a registered model or version that is not there: RESOURCE_DOES_NOT_EXIST (file and SQL stores, an MLflow
  server over REST, Unity Catalog); NOT_FOUND from Databricks services that use the newer error codes.
- an alias that is not set: the file and SQL stores (and so an MLflow server) raise INVALID_PARAMETER_VALUE
  "Registered model alias ... not found". That code also means "bad argument", so it reads as missing only
  when the registered model, read again, has no such alias.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from recsys.config import Config

CHALLENGER, CHAMPION = "challenger", "champion"  # the latest trained system; the one the gate let through
ALIASES = (CHALLENGER, CHAMPION)

_DOES_NOT_EXIST = {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"}
_BAD_ARGUMENT = "INVALID_PARAMETER_VALUE"  # the file and SQL stores' code for an alias that is not set


class RegistryUnavailable(RuntimeError):
    """The registry did not answer: nothing may be promoted or published on the strength of its silence."""


def _code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)  # MlflowException and RestException carry MLflow's error code


def _shown(uri: str) -> str:
    """The URI without any user:password part, fit for an error message."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


class Registry:
    """Alias and version lookups on one MLflow model registry (`client`, reached at `uri`)."""

    def __init__(self, client: Any, uri: str):
        self.client = client
        self.uri = uri

    @classmethod
    def of(cls, config: Config) -> Registry:
        return cls(config.mlflow_client(), config.registry_uri)

    # -- lookups
    def alias(self, name: str, alias: str) -> ModelVersion | None:
        """The version under `alias` of registered model `name`; None when the model or the alias is not there."""
        try:
            return self.client.get_model_version_by_alias(name, alias)
        except Exception as exc:  # noqa: BLE001 - sorted below: "not there" or unavailable
            if _code(exc) in _DOES_NOT_EXIST or (_code(exc) == _BAD_ARGUMENT and alias not in self._aliases(name)):
                return None
            raise self._unavailable(f"the alias {alias!r} of {name!r}", exc) from exc

    def alias_version(self, name: str, alias: str) -> str | None:
        found = self.alias(name, alias)
        return None if found is None else str(found.version)

    def aliases(self, name: str, aliases: tuple[str, ...] = ALIASES) -> dict[str, str]:
        """alias -> version for those of `aliases` that are set on `name` (the others left out)."""
        versions = {alias: self.alias_version(name, alias) for alias in aliases}
        return {alias: version for alias, version in versions.items() if version is not None}

    def version(self, name: str, version: str | int) -> ModelVersion:
        """A version that must exist (a gate decision or a ranker names it): missing is a LookupError."""
        found = self._ask(f"version {version} of {name!r}", self.client.get_model_version, name, str(version))
        if found is None:
            raise LookupError(f"registered model {name!r} has no version {version} in the registry {_shown(self.uri)}")
        return found

    # -- writes that depend on a lookup
    def ensure_model(self, name: str) -> None:
        """Create registered model `name` unless it exists (before its first version)."""
        if self._ask(f"the registered model {name!r}", self.client.get_registered_model, name) is None:
            self.client.create_registered_model(name)

    # -- the one rule
    def _ask(self, what: str, call: Callable[..., Any], *args: Any) -> Any:
        """`call(*args)`; None when MLflow says it does not exist, RegistryUnavailable on any other failure."""
        try:
            return call(*args)
        except Exception as exc:  # noqa: BLE001 - sorted below: "not there" or unavailable
            if _code(exc) in _DOES_NOT_EXIST:
                return None
            raise self._unavailable(what, exc) from exc

    def _aliases(self, name: str) -> dict[str, Any]:
        model = self._ask(f"the aliases of {name!r}", self.client.get_registered_model, name)
        return {} if model is None else model.aliases  # alias -> version, in every store

    def _unavailable(self, what: str, exc: BaseException) -> RegistryUnavailable:
        reason = _code(exc) or type(exc).__name__
        return RegistryUnavailable(
            f"model registry {_shown(self.uri)} could not be read for {what} ({reason}: {exc}); stopping here "
            "rather than reading it as 'not there', so nothing is promoted or published"
        )


# --- systems: a two-tower version and the ranker trained on it, under one alias ------------------------------
def system_versions(config: Config) -> dict[str, dict[str, str]]:
    """alias -> the system under it: {two-tower name: version[, ranker name: version]}.

    A ranker version carries the two-tower version it was trained with (tag `two_tower_version`): that pair is
    one system. A two-tower alias without a ranker is a system of its own (scored by the model alone). A
    registry that cannot answer raises `RegistryUnavailable`: it never reads as "no champion"."""
    registry = Registry.of(config)
    towers = registry.aliases(config.mlflow.registered_model)
    rankers = registry.aliases(config.mlflow.ranker_model)
    out: dict[str, dict[str, str]] = {}
    for alias in (CHALLENGER, CHAMPION):
        if alias in rankers:
            version = registry.version(config.mlflow.ranker_model, rankers[alias])
            tower = version.tags.get("two_tower_version") or towers.get(alias)
            out[alias] = {config.mlflow.registered_model: str(tower), config.mlflow.ranker_model: rankers[alias]}
        elif alias in towers:
            out[alias] = {config.mlflow.registered_model: towers[alias]}
    return out


def system_label(config: Config, system: Mapping[str, str]) -> str:
    """'two_tower=3,ranker=2': the versions a list came from (recorded with every publish)."""
    names = {config.mlflow.registered_model: "two_tower", config.mlflow.ranker_model: "ranker"}
    order = list(names)  # retrieval first, then the ranker over it, whatever order the versions came in
    models = sorted(system, key=lambda n: (order.index(n) if n in order else len(order), n))
    return ",".join(f"{names.get(n, n)}={system[n]}" for n in models)
