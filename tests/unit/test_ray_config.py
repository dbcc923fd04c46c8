"""ray_config.yaml is a valid Ray cluster launcher config with multi-GPU worker nodes."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_ray_config_validates_against_rays_schema():
    config = yaml.safe_load((ROOT / "ray_config.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    gpu_nodes = [t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) > 1]
    assert gpu_nodes, "needs at least one multi-GPU worker node type"
    assert config["head_node_type"] in config["available_node_types"]


def test_schema_rejects_a_broken_config():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "ray_config.yaml").read_text())
    config["available_node_types"]["head"]["max_workers"] = "many"
    try:
        jsonschema.validate(config, schema)
    except jsonschema.ValidationError:
        return
    raise AssertionError("a string max_workers should not validate")
