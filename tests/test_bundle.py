"""The Databricks bundle: valid against the official schema, a stage DAG whose every task runs the package.

`databricks bundle validate` needs a workspace; these checks need none. The schema comes from the Databricks CLI
repository (../shared/databricks/bundle-schema.json next to the project); without it the schema test is skipped
and the structural checks still run. Interpolations (`${var.catalog}`) stay as they are for the schema check and
are resolved from the bundle's own variables for the parser check.
"""
from __future__ import annotations

import copy
import functools
import importlib
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from recsys.cli import COMMANDS, build_parser
from recsys.config import load_config
from recsys.pipeline import STAGES as PIPELINE_STAGES

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "databricks.yml"
SCHEMA = ROOT / ".." / "shared" / "databricks" / "bundle-schema.json"
STAGES = list(PIPELINE_STAGES)
RUNTIME = "15.4.x-cpu-ml-scala2.12"
REFERENCE = re.compile(r"\$\{([^}]+)\}")
JOB_PARAMETER = re.compile(r"\{\{job\.parameters\.([^}]+)\}\}")  # a dynamic value reference, filled at run time


def bundle_files() -> dict[Path, dict]:
    """databricks.yml and every file its `include` globs match, each parsed on its own."""
    root = yaml.safe_load(BUNDLE.read_text())
    files = {BUNDLE: root}
    for pattern in root.get("include", []):
        matched = sorted(ROOT.glob(pattern))
        assert matched, f"databricks.yml: include {pattern!r} matches no file"
        files.update({path: yaml.safe_load(path.read_text()) for path in matched})
    return files


def merged_bundle() -> dict:
    """The bundle as the CLI sees it before targets: includes merged into the root (resources by kind and name)."""
    files = bundle_files()
    bundle = copy.deepcopy(files[BUNDLE])
    for path, doc in files.items():
        if path == BUNDLE:
            continue
        for kind, items in (doc.get("resources") or {}).items():
            target = bundle.setdefault("resources", {}).setdefault(kind, {})
            clash = set(target) & set(items)
            assert not clash, f"{path.name}: resources.{kind} {sorted(clash)} defined twice"
            target.update(copy.deepcopy(items))
    return bundle


def job_tasks(bundle: dict) -> list[tuple[str, dict, dict]]:
    return [
        (name, job, task)
        for name, job in bundle["resources"]["jobs"].items()
        for task in job.get("tasks", [])
    ]


def resolve(value, context: dict, where: str):
    """Replace every `${a.b.c}` inside strings by its value in `context` (repeatedly: variables may nest)."""
    if isinstance(value, dict):
        return {k: resolve(v, context, where) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, context, where) for v in value]
    if not isinstance(value, str):
        return value

    def lookup(match: re.Match) -> str:
        node = context
        for part in match.group(1).split("."):
            if not isinstance(node, dict) or part not in node:
                raise AssertionError(f"{where}: ${{{match.group(1)}}} does not resolve")
            node = node[part]
        return str(node)

    for _ in range(5):
        value, n = REFERENCE.subn(lookup, value)
        if not n:
            return value
    raise AssertionError(f"{where}: interpolation loop in {value!r}")


def with_job_parameters(params: list, job: dict, where: str) -> list:
    """What Databricks passes at run time: each `{{job.parameters.NAME}}` replaced by the run's value, here the
    job's default; a name the job does not declare is an error."""
    defaults = {p["name"]: p["default"] for p in job.get("parameters", [])}

    def lookup(match: re.Match) -> str:
        assert match.group(1) in defaults, f"{where}: {match.group(0)} names no parameter of the job"
        return str(defaults[match.group(1)])

    return [JOB_PARAMETER.sub(lookup, p) if isinstance(p, str) else p for p in params]


def target_context(bundle: dict, target: str, extra_vars: dict | None = None) -> dict:
    """What the CLI would substitute for `target`: variables (defaults, then the target's), bundle, workspace."""
    declared = bundle["variables"]
    values = {name: spec.get("default") for name, spec in declared.items()}
    values.update((bundle["targets"][target].get("variables") or {}))
    values.update(extra_vars or {})
    missing = sorted(name for name, value in values.items() if value is None)
    assert not missing, f"target {target}: variables without a value: {missing}"
    context = {
        "bundle": {"name": bundle["bundle"]["name"], "target": target},
        "workspace": {
            "file_path": f"/Workspace/Users/someone@example.com/.bundle/recsys/{target}/files",
            "current_user": {"userName": "someone@example.com", "short_name": "someone"},
        },
        "var": values,
    }
    context["resources"] = bundle["resources"]  # e.g. ${resources.registered_models.two_tower.name}
    return context


# --- the official schema ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def schema_validator():
    """Draft 2020-12 validator over the CLI's schema; its `\\p{L}`/`\\p{N}` classes rewritten for Python's `re`."""
    if not SCHEMA.exists():
        pytest.skip(f"official bundle schema not present at {SCHEMA.resolve()}")
    import jsonschema
    from jsonschema import validators

    def unicode_pattern(validator, pattern, instance, schema):
        if validator.is_type(instance, "string"):
            python = (pattern.replace(r"[\p{L}\p{N}]", r"[^\W_]")
                      .replace(r"\p{L}", r"[^\W\d_]").replace(r"\p{N}", r"\d"))
            if not re.search(python, instance):
                yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")

    cls = validators.extend(jsonschema.Draft202012Validator, {"pattern": unicode_pattern})
    return cls(json.loads(SCHEMA.read_text()))


def schema_errors(doc: dict) -> list[str]:
    from jsonschema.exceptions import best_match

    errors = []
    for error in schema_validator().iter_errors(doc):
        leaf = best_match([error])  # a oneOf (object | interpolation) hides the real message in its context
        errors.append(f"{'/'.join(map(str, leaf.absolute_path)) or '<root>'}: {leaf.message[:200]}")
    return errors


def test_bundle_and_includes_match_the_official_schema():
    for path, doc in bundle_files().items():
        assert schema_errors(doc) == [], f"{path.relative_to(ROOT)} does not match the bundle schema"


def test_schema_check_rejects_a_wrong_key_and_a_wrong_type():
    doc = yaml.safe_load((ROOT / "resources" / "recsys-nightly-job.yml").read_text())
    task = doc["resources"]["jobs"]["recsys_nightly"]["tasks"][0]
    typo = copy.deepcopy(doc)
    typo["resources"]["jobs"]["recsys_nightly"]["tasks"][0]["python_wheel_tasks"] = task["python_wheel_task"]
    assert any("python_wheel_tasks" in e for e in schema_errors(typo))
    wrong_type = copy.deepcopy(doc)
    wrong_type["resources"]["jobs"]["recsys_nightly"]["tasks"][0]["max_retries"] = "often"
    assert schema_errors(wrong_type)
    unknown_var = copy.deepcopy(doc)
    unknown_var["resources"]["jobs"]["recsys_nightly"]["max_concurrent_runs"] = "${nope.k}"
    assert schema_errors(unknown_var)


# --- structure: the stage DAG on the ML runtime ---------------------------------------------------------------

def test_nightly_job_follows_the_stage_dag():
    job = merged_bundle()["resources"]["jobs"]["recsys_nightly"]
    tasks = {t["task_key"]: t for t in job["tasks"]}
    assert list(tasks) == STAGES
    for previous, stage in zip(STAGES, STAGES[1:]):
        assert [d["task_key"] for d in tasks[stage]["depends_on"]] == [previous], stage
    assert "depends_on" not in tasks["ingest"]
    schedule = job["schedule"]
    assert len(schedule["quartz_cron_expression"].split()) in (6, 7) and schedule["timezone_id"]
    assert job["email_notifications"]["on_failure"]
    assert job["max_concurrent_runs"] == 1


def test_every_task_runs_on_the_ml_runtime_with_retries():
    bundle = merged_bundle()
    for name, job, task in job_tasks(bundle):
        clusters = {c["job_cluster_key"]: c["new_cluster"] for c in job["job_clusters"]}
        assert task["job_cluster_key"] in clusters, f"{name}.{task['task_key']}: unknown job cluster"
        assert clusters[task["job_cluster_key"]]["spark_version"] == RUNTIME
        assert task.get("max_retries", 0) >= 1, f"{name}.{task['task_key']} has no retries"


def test_targets_dev_in_development_mode_and_prod():
    targets = merged_bundle()["targets"]
    assert targets["dev"]["mode"] == "development" and targets["prod"]["mode"] == "production"
    # prod pages someone on failure besides the email: a notification destination, per target
    paging = targets["prod"]["resources"]["jobs"]["recsys_nightly"]["webhook_notifications"]["on_failure"]
    assert paging == [{"id": "${var.failure_webhook_id}"}]
    assert set(merged_bundle()["variables"]) >= {"catalog", "schema", "model_name", "k"}


def test_every_variable_reference_is_declared():
    declared = set(merged_bundle()["variables"])
    for path in bundle_files():
        used = set(re.findall(r"\$\{var\.([A-Za-z0-9_-]+)\}", path.read_text()))
        assert used <= declared, f"{path.name}: undeclared variables {sorted(used - declared)}"


# --- every task's entry point exists and accepts its parameters ------------------------------------------------

def test_artifact_builds_this_project_and_tasks_install_it():
    bundle = merged_bundle()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (artifact,) = bundle["artifacts"].values()
    assert artifact["type"] == "whl" and (ROOT / artifact["path"] / "pyproject.toml").exists()
    assert "dist" in artifact["build"]
    for name, job, task in job_tasks(bundle):
        wheels = [lib["whl"] for lib in task.get("libraries", []) if "whl" in lib]
        assert wheels, f"{name}.{task['task_key']} installs no wheel"
        resource_file = ROOT / "resources"
        for whl in wheels:
            assert (resource_file / whl).resolve().parent == (ROOT / artifact["path"] / "dist").resolve(), whl
        wheel_task = task.get("python_wheel_task")
        if wheel_task:
            assert wheel_task["package_name"] == project["name"]
            module, _, attr = project["scripts"][wheel_task["entry_point"]].partition(":")
            assert callable(getattr(importlib.import_module(module), attr))
        python_task = task.get("spark_python_task")
        if python_task:
            assert (resource_file / python_task["python_file"]).resolve().is_file(), python_task["python_file"]


@pytest.mark.parametrize("target", ["dev", "prod"])
def test_wheel_task_parameters_are_accepted_by_the_cli(target):
    bundle = merged_bundle()
    context = target_context(bundle, target, {"alert_email": "oncall@example.com", "failure_webhook_id": "0a1b2c"}
                             if target == "prod" else None)
    values = resolve(context["var"], context, f"target {target} variables")
    model = resolve(context["resources"]["registered_models"]["two_tower"], context, "registered model")
    steps, options = [], set()
    for name, job, task in job_tasks(bundle):
        where = f"{name}.{task['task_key']}"
        params = with_job_parameters(resolve(task["python_wheel_task"]["parameters"], context, where), job, where)
        args = build_parser().parse_args(params)  # SystemExit here is an unknown option or command
        assert args.command == "pipeline" and args.command in COMMANDS
        steps.append(args.steps)
        options.add(tuple(p for p in params if p != args.steps))
        config = load_config(args.profile, args.set, args.conf)
        assert config.profile == "databricks"
        assert config.paths.catalog == f"{values['catalog']}.{values['schema']}"
        assert config.paths.raw_dir.startswith(f"/Volumes/{values['catalog']}/{values['schema']}/")
        assert config.tracking_uri == "databricks" and config.registry_uri == "databricks-uc"
        assert config.mlflow.registered_model == f"{model['catalog_name']}.{model['schema_name']}.{model['name']}"
        assert config.scoring.k == int(values["k"])
        assert args.date == "latest" and config.model.refresh == "warm"  # the newest drop, a warm refresh
        assert args.nightly and config.nightly.full_every_days == 7  # relists between weekly full runs
    assert steps == STAGES
    assert len(options) == 1, "every stage must get the same options (tables, volume, model, K)"


def test_cluster_points_the_package_at_the_synced_conf_folder():
    bundle = merged_bundle()
    (job,) = bundle["resources"]["jobs"].values()
    env = job["job_clusters"][0]["new_cluster"]["spark_env_vars"]
    assert env["RECSYS_CONF_DIR"].endswith("/conf") and (ROOT / "conf" / "databricks.yaml").exists()
    assert "conf/**" not in bundle.get("sync", {}).get("exclude", [])
