"""deploy/: the DaemonSet validates against the Kubernetes schemas offline (kubernetes-validate
ships them; run here in a network namespace with no network at all), says what a node agent
needs (hostNetwork, hostPID, the exact capabilities, the kernel mounts, bundles on a hostPath,
scrape annotations), and runs what the image runs (same command and arguments as the
Containerfile). The lab test (tests/lab/test_lab_watch.py) runs that command in the kernel VM."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import requires_root

ROOT = Path(__file__).parent.parent
MANIFEST = ROOT / "deploy" / "daemonset.yaml"
CONTAINERFILE = ROOT / "deploy" / "Containerfile"


def daemonset() -> dict:
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    return next(d for d in docs if d["kind"] == "DaemonSet")


def container_command() -> list[str]:
    c = daemonset()["spec"]["template"]["spec"]["containers"][0]
    return [*c["command"], *c["args"]]


def test_manifest_validates_strictly():
    import kubernetes_validate

    for doc in yaml.safe_load_all(MANIFEST.read_text()):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    broken = copy.deepcopy(daemonset())
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilites"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)
    broken = copy.deepcopy(daemonset())
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "metrics"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


@requires_root
def test_validation_needs_no_network(tmp_path: Path):
    exe = shutil.which("kubernetes-validate") or str(Path(__import__("sys").executable).with_name(
        "kubernetes-validate"))
    proc = subprocess.run(["unshare", "--net", exe, "--strict", str(MANIFEST)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert proc.stdout.count("passed") + proc.stderr.count("passed") == 2


def test_daemonset_is_a_node_agent():
    spec = daemonset()["spec"]["template"]
    pod = spec["spec"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    c = pod["containers"][0]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == {"NET_ADMIN", "SYS_ADMIN", "BPF", "PERFMON", "SYS_RESOURCE",
                                              "DAC_OVERRIDE"}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in ("/sys/kernel/tracing", "/sys/kernel/debug", "/lib/modules", "/usr/src", "/sys/fs/bpf",
                 "/var/lib/ipsec-capture"):
        assert path in mounts, path
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/var/lib/ipsec-capture"]["name"]]["hostPath"]["path"] == "/var/lib/ipsec-capture"
    ann = spec["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    argv = container_command()
    listen = argv[argv.index("--listen") + 1]
    assert listen.endswith(":" + ann["prometheus.io/port"]) and c["ports"][0]["containerPort"] == 9477
    assert argv[argv.index("--dir") + 1] == "/var/lib/ipsec-capture"


def test_containerfile_runs_what_the_daemonset_runs():
    text = CONTAINERFILE.read_text()
    assert re.search(r"^FROM debian:bookworm-slim$", text, re.M)
    assert "python3-bpfcc" in text and 'WITH_TSHARK" = 1' in text
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert [*entry, *cmd] == container_command()


def test_the_command_parses_as_our_cli():
    from ipsec_capture.cli import build_parser

    argv = container_command()[1:]
    args = build_parser(argv).parse_args(argv)
    assert args.command == "watch" and args.ring == 64 and args.listen == ":9477"
