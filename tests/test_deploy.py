"""Deployment files checked offline: the Kubernetes manifests in deploy/k8s and docker-compose.yml.

Nothing here needs a cluster or a container engine. Kubernetes objects are validated with
``kubernetes-validate`` (the API's JSON schemas, strict: unknown fields are errors); KEDA's objects,
which no Kubernetes schema covers, against tests/schemas/keda-v2.json; the compose file against the
compose-spec schema that ``check-jsonschema`` ships, before and after variable interpolation. Then
the properties the service relies on: probes, resources, secrets only from the Secret, models
read-only, the GPU request, and KEDA watching the queue the bot really fills.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from contract.keys import DELIVERY_QUEUE, INFERENCE_QUEUE

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30"  # the oldest minor version the manifests are meant for
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
KEDA_SCHEMA = json.loads((Path(__file__).parent / "schemas" / "keda-v2.json").read_text())
SECRET_NAME = "xray-secrets"
SECRET_ENV = {"TELEGRAM_BOT_TOKEN", "REDIS_URL", "REDIS_PASSWORD", "REDISCLI_AUTH", "FLOWER_BASIC_AUTH",
              "WEBHOOK_SECRET_TOKEN", "CELERY_BROKER_URL"}


def manifest_files() -> list[Path]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [K8S / name for name in kustomization["resources"]]


def load_all(paths: list[Path]) -> list[dict]:
    resources = []
    for path in paths:
        resources += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return resources


@pytest.fixture(scope="module")
def resources() -> list[dict]:
    return load_all(manifest_files())


def by_kind(resources: list[dict], kind: str) -> dict[str, dict]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def containers(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"]


def test_kustomization_lists_every_manifest_and_nothing_else():
    listed = {path.name for path in manifest_files()}
    present = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def validate(resource: dict) -> None:
    if resource["kind"] in KEDA_KINDS:
        jsonschema.Draft202012Validator(KEDA_SCHEMA).validate(resource)
    else:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_every_object_is_valid_against_its_schema(resources):
    assert len(resources) >= 14
    for resource in resources:
        validate(resource)


def test_the_validators_refuse_broken_objects(resources):
    """The checks above can fail: a typo'd field or a missing required one is refused."""
    deployment = json.loads(json.dumps(by_kind(resources, "Deployment")["xray-bot"]))
    containers(deployment)[0]["livenesProbe"] = containers(deployment)[0].pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    scaled = json.loads(json.dumps(by_kind(resources, "ScaledObject")["xray-worker-cpu"]))
    del scaled["spec"]["triggers"][0]["metadata"]["listName"]
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_kustomize_build_renders_valid_objects():
    rendered = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120,
                              check=True).stdout
    objects = [doc for doc in yaml.safe_load_all(rendered) if doc]
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"xray"}
    for resource in objects:
        validate(resource)
    images = {c["image"] for o in objects if o["kind"] == "Deployment" for c in containers(o)}
    assert all(":" in image for image in images)  # every image pinned to a tag by the kustomization


def test_every_container_has_probes_resources_and_a_locked_down_context(resources):
    for name, deployment in by_kind(resources, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod.get("automountServiceAccountToken") is False, name
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "xray-second-opinion", name  # Redis' NetworkPolicy
        for container in pod["containers"]:
            assert "livenessProbe" in container, name
            assert "readinessProbe" in container or "startupProbe" in container, name
            resources_ = container["resources"]
            assert resources_["requests"]["cpu"] and resources_["requests"]["memory"], name
            assert resources_["limits"]["memory"], name
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False, name


def test_secrets_come_only_from_the_secret(resources):
    for name, deployment in by_kind(resources, "Deployment").items():
        for container in containers(deployment):
            for variable in container.get("env", []):
                if variable["name"] in SECRET_ENV:
                    assert "value" not in variable, (name, variable["name"])
                    assert variable["valueFrom"]["secretKeyRef"]["name"] == SECRET_NAME, (name, variable["name"])
    config = by_kind(resources, "ConfigMap")["xray-config"]["data"]
    assert not SECRET_ENV & set(config)
    example = by_kind(resources, "Secret")[SECRET_NAME]["stringData"]
    assert {"TELEGRAM_BOT_TOKEN", "REDIS_URL", "REDIS_PASSWORD", "FLOWER_BASIC_AUTH"} <= set(example)
    assert all("replace" in value.lower() for value in example.values())  # placeholders, never real secrets
    # The example's URL carries the example's password (the two must describe the same Redis).
    assert example["REDIS_PASSWORD"] in example["REDIS_URL"]


def worker_queues(deployment: dict) -> str:
    command = containers(deployment)[0]["command"]
    return command[command.index("-Q") + 1]


def test_workers_consume_the_right_queues_and_read_models_read_only(resources):
    deployments = by_kind(resources, "Deployment")
    for name in ("xray-worker-cpu", "xray-worker-gpu"):
        deployment = deployments[name]
        assert worker_queues(deployment) == INFERENCE_QUEUE
        mounts = {m["name"]: m for m in containers(deployment)[0]["volumeMounts"]}
        assert mounts["models"]["readOnly"] is True and mounts["models"]["mountPath"] == "/models"
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["readOnly"] is True
    assert worker_queues(deployments["xray-worker-delivery"]) == DELIVERY_QUEUE
    assert "models" not in {v["name"] for v in deployments["xray-worker-delivery"]["spec"]["template"]["spec"]
                            ["volumes"]}
    gpu = containers(deployments["xray-worker-gpu"])[0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "DEVICE", "value": "cuda"} in gpu["env"]
    assert "nvidia.com/gpu" not in containers(deployments["xray-worker-cpu"])[0]["resources"]["limits"]
    # One poller per bot token: never two bots at once.
    bot = deployments["xray-bot"]
    assert bot["spec"]["replicas"] == 1 and bot["spec"]["strategy"]["type"] == "Recreate"


def test_keda_scales_the_inference_workers_on_the_queue_the_bot_fills(resources):
    deployments = by_kind(resources, "Deployment")
    scaled = by_kind(resources, "ScaledObject")
    auth = by_kind(resources, "TriggerAuthentication")
    service = by_kind(resources, "Service")["xray-redis"]
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled.values()} == {"xray-worker-cpu", "xray-worker-gpu"}
    for scaled_object in scaled.values():
        assert scaled_object["spec"]["scaleTargetRef"]["name"] in deployments
        (trigger,) = scaled_object["spec"]["triggers"]
        assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == INFERENCE_QUEUE
        host, port = trigger["metadata"]["address"].split(":")
        assert host.split(".")[0] == service["metadata"]["name"] and int(port) == service["spec"]["ports"][0]["port"]
        reference = auth[trigger["authenticationRef"]["name"]]["spec"]["secretTargetRef"][0]
        assert (reference["name"], reference["key"]) == (SECRET_NAME, "REDIS_PASSWORD")
    assert scaled["xray-worker-gpu"]["spec"]["minReplicaCount"] == 0  # GPUs only when images wait


# ----------------------------------------------------------------------------- docker-compose.yml
COMPOSE_ENV = {"TELEGRAM_BOT_TOKEN": "123456:EXAMPLE", "REDIS_PASSWORD": "example", "FLOWER_BASIC_AUTH": "a:b"}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable syntax: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $$."""

    def replace(match: re.Match) -> str:
        name, operator, argument = match.group(1), match.group(2) or "", match.group(3) or ""
        value = env.get(name)
        if operator.endswith("?"):
            if not value:
                raise KeyError(f"{name}: {argument}")
            return value
        if operator == ":-":
            return value or argument
        if operator == "-":
            return argument if value is None else value
        return value or ""

    text = text.replace("$$", "\0")
    text = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}", replace, text)
    return text.replace("\0", "$")


def compose_schema() -> dict:
    path = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(path.read_text())


def test_compose_file_matches_the_compose_spec_before_and_after_interpolation():
    text = (ROOT / "docker-compose.yml").read_text()
    validator = jsonschema.Draft202012Validator(compose_schema())
    validator.validate(yaml.safe_load(text))
    resolved = yaml.safe_load(interpolate(text, COMPOSE_ENV))
    validator.validate(resolved)
    assert resolved["services"]["bot"]["environment"]["REDIS_URL"] == "redis://:example@redis:6379/0"
    with pytest.raises(KeyError):  # a missing secret stops compose, as ${VAR:?} promises
        interpolate(text, {k: v for k, v in COMPOSE_ENV.items() if k != "TELEGRAM_BOT_TOKEN"})
    broken = yaml.safe_load(interpolate(text, COMPOSE_ENV))
    broken["services"]["bot"]["healthcheck"]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)


@pytest.mark.skipif(subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0
                    if shutil.which("docker") else True, reason="the docker compose plugin is not installed")
def test_docker_compose_config_accepts_the_file():  # pragma: no cover - only where the plugin exists
    env = {**os.environ, **COMPOSE_ENV}
    subprocess.run(["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], env=env,
                   check=True, timeout=60)


# --- Monitoring: Prometheus alert rules (promtool) and the Grafana dashboard -------------------------

PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "xray-service.json"
# A metric as the code declares it: Counter/Histogram("name", …) or GaugeMetricFamily("name", …).
DECLARED = re.compile(r'(?:Counter|Histogram|Gauge|Summary|GaugeMetricFamily)\(\s*"([a-z_][a-z0-9_]*)"')
BUCKET_SUFFIXES = ("_bucket", "_count", "_sum")
RATE_INTERVAL = "$__rate_interval"


def exported_metrics() -> set[str]:
    """Every metric name the code exports (contract/, bot/, worker/, api/), plus Prometheus' own ``up``."""
    names = {"up"}
    for package in ("contract", "bot", "worker", "api"):
        for path in (ROOT / package).rglob("*.py"):
            names |= set(DECLARED.findall(path.read_text(encoding="utf-8")))
    return names


def metric_names(expr: str) -> set[str]:
    found = set(re.findall(r"\b(xray_[a-z0-9_]+)\b", expr)) | ({"up"} if re.search(r"\bup\s*\{", expr) else set())
    return {next((n[: -len(s)] for s in BUCKET_SUFFIXES if n.endswith(s)), n) for n in found}


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_exported_metrics_are_found_in_the_code():
    names = exported_metrics()
    assert {"xray_queue_depth", "xray_queue_oldest_age_seconds", "xray_requests_total", "xray_telegram_429_total",
            "xray_api_requests_total", "xray_api_request_seconds", "xray_stage_seconds", "xray_errors_total"} <= names
    assert metric_names('histogram_quantile(0.5, sum by (le) (rate(xray_stage_seconds_bucket[5m])))') == \
        {"xray_stage_seconds"}


def test_alert_rules_cover_the_service_and_name_only_exported_metrics():
    rules = alert_rules()
    names = exported_metrics()
    for rule in rules:
        assert rule["alert"].startswith("Xray") and rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        used = metric_names(rule["expr"])
        assert used and used <= names, (rule["alert"], used - names)
    used = set().union(*(metric_names(rule["expr"]) for rule in rules))
    # The list: queue age and depth, error rate, no worker up, Telegram 429s, API 5xx.
    assert {"xray_queue_oldest_age_seconds", "xray_queue_depth", "xray_requests_total", "xray_errors_total", "up",
            "xray_telegram_429_total", "xray_api_requests_total"} <= used
    assert any('status=~"5.."' in rule["expr"] for rule in rules)


needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool is not installed (Debian: apt-get install prometheus)")


@needs_promtool
def test_promtool_checks_the_alert_rules_and_runs_their_unit_tests():
    checked = subprocess.run(["promtool", "check", "rules", str(PROMETHEUS / "alerts.yml")], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout
    tested = subprocess.run(["promtool", "test", "rules", "alerts.test.yml"], cwd=PROMETHEUS, capture_output=True,
                            text=True, timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    tested_alerts = {case["alertname"] for test in yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())["tests"]
                     for case in test["alert_rule_test"]}
    assert len(tested_alerts) >= 2 and tested_alerts <= {rule["alert"] for rule in alert_rules()}


@needs_promtool
def test_promtool_refuses_a_broken_rule(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n"
                      "        expr: sum(rate(xray_requests_total[5m])\n")  # a parenthesis short
    assert subprocess.run(["promtool", "check", "rules", str(broken)], capture_output=True, timeout=60).returncode != 0


def test_dashboard_is_valid_json_and_names_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    names = exported_metrics()
    exprs = dashboard_exprs()
    for expr in exprs:
        used = metric_names(expr)
        assert used and used <= names, (expr, used - names)
    used = set().union(*(metric_names(expr) for expr in exprs))
    # What operators watch: queue depth and age, request rates, latency per stage, errors, 429s, API 5xx.
    assert {"xray_queue_depth", "xray_queue_oldest_age_seconds", "xray_requests_total", "xray_api_requests_total",
            "xray_stage_seconds", "xray_api_request_seconds", "xray_errors_total", "xray_telegram_429_total"} <= used
    assert any("histogram_quantile(0.5," in e and "xray_stage_seconds" in e for e in exprs)
    assert any("histogram_quantile(0.95," in e and "xray_stage_seconds" in e for e in exprs)
    assert any('status=~"5.."' in e for e in exprs)


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses each query as a recording rule (Grafana's $__rate_interval read as 5m)."""
    rules = [{"record": f"xray:dashboard:{i}", "expr": expr.replace(RATE_INTERVAL, "5m")}
             for i, expr in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
