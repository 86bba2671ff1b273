"""Security checks that need no running service: deployment file, weight loading, unsafe deserialisation.

Covered elsewhere (real processes): Celery refuses pickled messages (test_end_to_end), the
allowlist and the rate limit (test_bot), /forget (test_bot), TTLs, logs and disk (test_privacy).
"""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest
import yaml
from model_factory import make_model

from diagnosis.cards import CardError, sha256_of

from .harness import ROOT

COMPOSE = ROOT / "docker-compose.yml"
SERVING_CODE = ("diagnosis", "bot", "worker", "training")


# ----------------------------------------------------------------------------- docker-compose.yml
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def test_redis_has_a_password_no_published_port_and_no_persistence(compose):
    redis_service = compose["services"]["redis"]
    assert "ports" not in redis_service, "Redis must not be published on the host"
    command = [str(part) for part in redis_service["command"]]
    assert "--requirepass" in command
    password = command[command.index("--requirepass") + 1]
    assert password.startswith("${REDIS_PASSWORD:?"), "the password must be required, with no default"
    assert command[command.index("--save") + 1] == "" and command[command.index("--appendonly") + 1] == "no"
    assert set(redis_service["networks"]) == {"backend"}
    assert compose["networks"]["backend"].get("internal") is True  # no route out of the Redis network


def test_every_service_connects_to_redis_with_the_password_and_nothing_publishes_6379(compose):
    for name, service in compose["services"].items():
        environment = service.get("environment") or {}
        url = environment.get("REDIS_URL")
        if name != "redis":
            assert url is not None, f"{name} has no REDIS_URL"
            assert url.startswith("redis://:${REDIS_PASSWORD:?") and url.endswith("@redis:6379/0"), (name, url)
        for mapping in service.get("ports") or []:
            text = str(mapping)
            assert "6379" not in text, f"{name} publishes Redis: {text}"
            assert text.startswith("127.0.0.1:"), f"{name} publishes {text} on every interface"


def test_containers_are_read_only_with_a_tmpfs(compose):
    for name in ("bot", "worker-cpu", "worker-delivery"):
        service = compose["services"][name]
        assert service.get("read_only") is True, name
        assert "/tmp" in service.get("tmpfs", []), name  # nosec: a path in the compose file


# ----------------------------------------------------------------------------- weights
class _Payload:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return Path.touch, (self.target,)


def test_weights_load_from_safetensors_only_never_unpickled(tmp_path):
    from diagnosis.network import load_model

    folder = tmp_path / "gate"
    make_model(folder, role="gate", labels=["not_xray", "xray"], activation="softmax", biases=[0.0, 0.0], size=32,
               positive_label="xray")
    sentinel = tmp_path / "pickle-was-executed"
    payload = pickle.dumps(_Payload(sentinel))
    pickle.loads(payload)  # the payload is live …
    assert sentinel.exists()
    sentinel.unlink()

    (folder / "weights.pt").write_bytes(payload)  # … a card pointing at it, with the right hash
    card = json.loads((folder / "card.json").read_text())
    card["weights"] = {**card["weights"], "file": "weights.pt", "sha256": sha256_of(folder / "weights.pt")}
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(Exception):  # safetensors refuses the file, whatever its message
        load_model(folder)
    assert not sentinel.exists(), "loading the model executed a pickle"


def test_tampered_weights_are_refused(tmp_path):
    from diagnosis.network import load_model

    folder = tmp_path / "gate"
    make_model(folder, role="gate", labels=["not_xray", "xray"], activation="softmax", biases=[0.0, 0.0], size=32,
               positive_label="xray")
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CardError, match="sha256 mismatch"):
        load_model(folder)


UNSAFE_CALLS = {
    ("torch", "load"), ("torch.jit", "load"), ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"),
    ("cPickle", "load"), ("joblib", "load"), ("dill", "load"), ("dill", "loads"), ("cloudpickle", "load"),
    ("cloudpickle", "loads"), ("shelve", "open"), ("marshal", "load"), ("marshal", "loads"),
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_no_unsafe_deserialisation_in_the_service_code():
    problems = []
    for folder in SERVING_CODE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "cloudpickle", "marshal"):
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import …")
                if not isinstance(node, ast.Call):
                    continue
                name = _dotted(node.func)
                owner, _, attr = name.rpartition(".")
                keywords = {k.arg: k.value for k in node.keywords}
                if (owner, attr) in UNSAFE_CALLS or (owner.endswith("torch") and attr == "load"):
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}()")
                elif attr == "load" and owner in ("np", "numpy") and isinstance(keywords.get("allow_pickle"),
                                                                                 ast.Constant) \
                        and keywords["allow_pickle"].value:
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}(allow_pickle=True)")
                elif name in ("yaml.load", "yaml.load_all", "yaml.unsafe_load"):
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}()")
    assert not problems, "\n".join(problems)


def test_the_bot_and_the_workers_accept_json_only():
    from bot.dispatch import make_client
    from contract.settings import ServiceSettings
    from worker import app

    assert app.conf.accept_content == ["json"] and app.conf.task_serializer == "json"
    client = make_client(ServiceSettings(_env_file=None))
    try:
        assert client.conf.accept_content == ["json"] and client.conf.task_serializer == "json"
    finally:
        client.close()
