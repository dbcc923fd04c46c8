"""ray_config.yaml (cloud) and ray_config.local.yaml (lab servers) are valid Ray cluster launcher configs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["ray_config.yaml", "ray_config.local.yaml"]
INSTALL = re.compile(r"^cd (\S+) && python3 -m pip install( -q)? -e '?\.(\[cluster\])?'?$")


def _schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_ray_config_validates_against_rays_schema(name):
    # `ray up` validates the file as Ray prepares it (defaults filled in; the local provider
    # first moves min_workers into its single node type, a key the raw schema does not have),
    # so check that, with Ray's own checks on top of the schema.
    config = prepare_config(_load(name))
    jsonschema.validate(config, _schema())
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]
    # The checkout is mounted where every node installs it.
    installs = [m for c in config["setup_commands"] if (m := INSTALL.match(c))]
    assert installs, f"{name}: setup_commands must install the project on every node"
    assert {m.group(1) for m in installs} <= set(config["file_mounts"])
    assert any(c.startswith("ray start --head --port=6379") for c in config["head_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in config["worker_start_ray_commands"]


def test_cloud_config_has_multi_gpu_workers():
    config = _load("ray_config.yaml")
    jsonschema.validate(config, _schema())  # the file as written, too
    gpu_nodes = [t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) > 1]
    assert gpu_nodes, "needs at least one multi-GPU worker node type"
    assert config["head_node_type"] in config["available_node_types"]


def test_local_config_lists_the_lab_servers_and_installs_alike():
    config = _load("ray_config.local.yaml")
    provider = config["provider"]
    assert provider["type"] == "local"
    assert isinstance(provider["head_ip"], str) and provider["head_ip"]
    workers = provider["worker_ips"]
    assert workers and all(isinstance(ip, str) and ip for ip in workers)
    assert provider["head_ip"] not in workers and len(set(workers)) == len(workers)
    # The local provider aborts on node types (Ray detects each node's GPUs) and caps both
    # counts at the listed workers.
    assert "available_node_types" not in config and "head_node_type" not in config
    assert 0 <= config["min_workers"] <= config["max_workers"] <= len(workers)
    assert config["auth"]["ssh_user"]
    # Every node runs the same install: nothing node-specific beside setup_commands.
    assert not config.get("head_setup_commands") and not config.get("worker_setup_commands")
    assert "--dashboard-host=0.0.0.0" in " ".join(config["head_start_ray_commands"])


def _string_max_workers(config: dict) -> None:
    config["available_node_types"]["head"]["max_workers"] = "many"


def _string_worker_ips(config: dict) -> None:
    config["provider"]["worker_ips"] = "192.0.2.11,192.0.2.12"


@pytest.mark.parametrize(
    ("name", "breakage"), [("ray_config.yaml", _string_max_workers), ("ray_config.local.yaml", _string_worker_ips)]
)
def test_schema_rejects_a_broken_config(name, breakage):
    config = _load(name)
    breakage(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(prepare_config(config), _schema())
