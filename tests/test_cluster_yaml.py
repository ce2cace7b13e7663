"""Offline checks of the Ray cluster launcher config (cluster.yaml).

No cloud credentials or network are needed: the config is validated against
the JSON schema shipped in the installed ray package and run through Ray's own
offline config preparation; the AWS-specific bootstrap (IAM role, key pair,
subnets, security group creation) talks to AWS and is therefore not called.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
ray = pytest.importorskip("ray")

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
SCHEMA_PATH = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"

SENSITIVE_PORTS = (6379, 8265, 10001)  # GCS, dashboard/job API, Ray client
PUBLIC_V4 = ipaddress.ip_network("0.0.0.0/0")
PUBLIC_V6 = ipaddress.ip_network("::/0")


# --------------------------------------------------------------------------
# fixtures / helpers
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_text() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def config(raw_text) -> dict:
    cfg = yaml.safe_load(raw_text)
    assert isinstance(cfg, dict)
    return cfg


@pytest.fixture
def cfg(config) -> dict:
    """A private deep copy (Ray's helpers mutate their input)."""
    return copy.deepcopy(config)


def _head_start_line(config) -> str:
    lines = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert len(lines) == 1, lines
    return lines[0]


def _ray_start_args(cmd: str) -> list[str]:
    """Tokens after `ray start` in a command like `ulimit ...; ray start ...`."""
    seg = cmd.split("ray start", 1)[1]
    return shlex.split(seg.split(";")[0].split("&&")[0])


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def _is_public(cidr: str) -> bool:
    """True for "the internet" (0.0.0.0/0, ::/0) or similarly huge ranges."""
    net = ipaddress.ip_network(cidr, strict=False)
    if net in (PUBLIC_V4, PUBLIC_V6):
        return True
    # Very wide ranges (e.g. 0.0.0.0/1) are public in effect, too.
    return net.prefixlen < 8


def _port_range(rule: dict) -> tuple[int, int]:
    proto = str(rule.get("IpProtocol", "")).lower()
    if proto in ("-1", "all"):
        return (0, 65535)
    lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
    if lo in (-1, None) or hi in (-1, None):
        return (0, 65535)
    return (int(lo), int(hi))


def _public_cidrs(rule: dict) -> list[str]:
    cidrs = [r["CidrIp"] for r in rule.get("IpRanges", []) if "CidrIp" in r]
    cidrs += [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", []) if "CidrIpv6" in r]
    return [c for c in cidrs if _is_public(c)]


def _assert_rules_safe(rules: list[dict], allow_public_ssh: bool) -> None:
    for rule in rules:
        lo, hi = _port_range(rule)
        proto = str(rule.get("IpProtocol", "")).lower()
        for port in SENSITIVE_PORTS:
            if lo <= port <= hi:
                # A rule covering a Ray port may only admit cluster members
                # (security-group references), never IP ranges.
                assert not rule.get("IpRanges") and not rule.get("Ipv6Ranges"), (
                    f"rule {rule} exposes port {port} to an IP range"
                )
                assert not rule.get("PrefixListIds"), rule
        public = _public_cidrs(rule)
        if public:
            assert allow_public_ssh, f"rule {rule} opens {public} to the internet"
            assert proto == "tcp" and (lo, hi) == (22, 22), (
                f"only SSH (22/tcp) may be open to {public}; got {rule}"
            )


# --------------------------------------------------------------------------
# schema / Ray's own offline validation
# --------------------------------------------------------------------------


def test_schema_file_ships_with_ray():
    assert SCHEMA_PATH.is_file(), SCHEMA_PATH


def test_validates_against_ray_schema(cfg):
    schema = json.loads(SCHEMA_PATH.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(cfg), key=lambda e: list(e.path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors
    )


def test_ray_prepare_and_validate_config_offline(cfg):
    """Ray's `ray up` pipeline up to (excluding) the cloud bootstrap.

    prepare_config merges the AWS defaults.yaml, merges setup_commands into
    head/worker setup commands and fills per-node min/max workers;
    validate_config re-checks the schema plus cross-field rules (head_node_type
    exists, sum of min_workers <= max_workers, ...). Both are pure functions.
    The next step of `ray up`, bootstrap_aws(), creates/looks up IAM roles,
    key pairs, subnets and security groups via boto3 and needs AWS
    credentials, so it is deliberately not called here.
    """
    util = pytest.importorskip("ray.autoscaler._private.util")
    prepared = util.prepare_config(cfg)
    util.validate_config(prepared)

    # Our explicit choices survive the defaults merge.
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["cache_stopped_nodes"] is False
    assert prepared["head_node_type"] == "head"
    assert set(prepared["available_node_types"]) == {"head", "gpu_worker"}
    assert prepared["head_start_ray_commands"] == cfg["head_start_ray_commands"]
    assert prepared["worker_start_ray_commands"] == cfg["worker_start_ray_commands"]
    # setup_commands are prepended to both head and worker setup commands.
    n = len(cfg["setup_commands"])
    assert prepared["head_setup_commands"][:n] == cfg["setup_commands"]
    assert prepared["worker_setup_commands"][:n] == cfg["setup_commands"]


# --------------------------------------------------------------------------
# cluster shape
# --------------------------------------------------------------------------


def test_basic_fields(config):
    assert config["cluster_name"] == "nc-ray"
    assert config["max_workers"] >= 1
    assert config["idle_timeout_minutes"] > 0
    assert config["upscaling_speed"] > 0
    prov = config["provider"]
    assert prov["type"] == "aws"
    assert prov["region"] == "us-west-2"
    assert all(z.strip().startswith("us-west-2") for z in prov["availability_zone"].split(","))
    assert prov["cache_stopped_nodes"] is False
    assert config["auth"]["ssh_user"] == "ubuntu"


def test_head_node_runs_no_trials(config):
    assert config["head_node_type"] == "head"
    head = config["available_node_types"]["head"]
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0
    assert head.get("min_workers", 0) == 0
    assert head.get("max_workers", 0) == 0
    assert head["node_config"]["InstanceType"].startswith("m")


def test_gpu_worker(config):
    w = config["available_node_types"]["gpu_worker"]
    assert w["node_config"]["InstanceType"].startswith("g5.")
    assert w["min_workers"] == 0
    assert 1 <= w["max_workers"] <= config["max_workers"]
    # If resources are given explicitly they must advertise the GPU.
    if w["resources"]:
        assert w["resources"].get("GPU", 0) >= 1


def test_node_configs_have_ami_and_disk(config):
    for name, nt in config["available_node_types"].items():
        nc = nt["node_config"]
        assert str(nc["ImageId"]).startswith("ami-"), name
        # Ray's `latest_dlami` maps to an outdated Ubuntu 18.04/CUDA 11.2 image.
        assert nc["ImageId"] != "latest_dlami"
        bdm = nc["BlockDeviceMappings"]
        assert bdm and bdm[0]["Ebs"]["VolumeSize"] >= 100, name
        # Security groups come from provider.security_group, not ad hoc ids.
        assert "SecurityGroupIds" not in nc, name


# --------------------------------------------------------------------------
# security
# --------------------------------------------------------------------------


def test_dashboard_bound_to_localhost(config):
    args = _ray_start_args(_head_start_line(config))
    assert "--head" in args
    assert _flag_value(args, "--dashboard-host") == "127.0.0.1"
    assert _flag_value(args, "--port") == "6379"
    assert _flag_value(args, "--autoscaling-config") == "~/ray_bootstrap_config.yaml"
    # No command anywhere binds a Ray service to all interfaces explicitly.
    all_cmds = [
        c
        for key in (
            "initialization_commands",
            "setup_commands",
            "head_setup_commands",
            "worker_setup_commands",
            "head_start_ray_commands",
            "worker_start_ray_commands",
        )
        for c in config.get(key, [])
    ]
    assert not any("0.0.0.0" in c for c in all_cmds)


def test_workers_join_head_over_gcs_port(config):
    cmds = config["worker_start_ray_commands"]
    assert cmds[0].strip() == "ray stop"
    starts = [c for c in cmds if "ray start" in c]
    assert len(starts) == 1
    args = _ray_start_args(starts[0])
    assert _flag_value(args, "--address") == "$RAY_HEAD_IP:6379"
    assert config["head_start_ray_commands"][0].strip() == "ray stop"


def test_security_group_rules_only_ssh_from_cidr(config):
    sg = config["provider"]["security_group"]
    assert sg["GroupName"]
    rules = sg["IpPermissions"]
    assert rules, "expected an explicit SSH rule"
    # No rule in the config is public at all (not even SSH): SSH is limited
    # to the configurable CIDR placeholder.
    _assert_rules_safe(rules, allow_public_ssh=False)
    for rule in rules:
        assert str(rule["IpProtocol"]).lower() == "tcp"
        assert (rule["FromPort"], rule["ToPort"]) == (22, 22), rule
        assert rule.get("IpRanges"), rule
        for r in rule["IpRanges"]:
            ipaddress.ip_network(r["CidrIp"], strict=True)  # well-formed CIDR


def test_effective_security_group_rules(config):
    """The rules Ray would actually apply when it creates the group.

    Ray adds an intra-cluster rule (source = the cluster's own security
    groups) and a default SSH rule to our IpPermissions. Build that exact list
    with Ray's own helper (pure, no AWS call) and check that nothing but
    SSH is reachable from the internet; 6379/8265/10001 only from members.
    """
    pytest.importorskip("boto3")  # ray's aws module asserts on boto3 at import
    aws_config = pytest.importorskip("ray.autoscaler._private.aws.config")
    fake_sgids = {"sg-00000000000000001"}
    rules = aws_config._create_default_inbound_rules(
        fake_sgids, config["provider"]["security_group"]["IpPermissions"]
    )
    _assert_rules_safe(rules, allow_public_ssh=True)
    intracluster = [r for r in rules if r.get("UserIdGroupPairs")]
    assert intracluster and all(
        {p["GroupId"] for p in r["UserIdGroupPairs"]} <= fake_sgids for r in intracluster
    )


# --------------------------------------------------------------------------
# code shipping / environment
# --------------------------------------------------------------------------


def test_repo_is_shipped_and_installed(config):
    assert config["file_mounts"] == {"/home/ubuntu/nc_ray": "."}
    # "." is the cwd of `ray up`: the repo root (documented in the header).
    assert (REPO_ROOT / config["file_mounts"]["/home/ubuntu/nc_ray"] / "pyproject.toml").is_file()
    setup = config["setup_commands"]
    assert any(re.search(r"\bpip install -e /home/ubuntu/nc_ray\b", c) for c in setup)
    assert any(re.search(r"\bpip install\b.*\btorch\b", c) for c in setup)
    assert any(re.search(r"\bpip install\b.*\bray\[[^\]]*default", c) for c in setup)
    # torch is installed before nc_ray so nc_ray's `torch>=2.1` is already met.
    idx_torch = next(i for i, c in enumerate(setup) if re.search(r"install\b.*\btorch\b", c))
    idx_ncray = next(i for i, c in enumerate(setup) if "-e /home/ubuntu/nc_ray" in c)
    assert idx_torch < idx_ncray
    # The head's autoscaler needs boto3 to launch workers.
    assert any("boto3" in c for c in config["head_setup_commands"])


def test_usage_is_documented(raw_text):
    for snippet in (
        "ray up cluster.yaml",
        "ray dashboard cluster.yaml",
        "ray job submit --address http://127.0.0.1:8265 --working-dir .",
        "nc-ray sweep jobs/mnist_mlp.yaml --storage s3://YOUR-BUCKET/sweeps",
        "ray down cluster.yaml",
    ):
        assert snippet in raw_text, snippet
