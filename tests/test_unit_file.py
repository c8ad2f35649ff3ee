"""Checks for systemd/gpu-router.service: systemd-analyze verify/security and the daemon's key settings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "gpu-router.service"
BINARY = "/opt/gpu-router/venv/bin/gpu-router"
CONFIG = "/etc/gpu-router/config.yaml"
# systemd-analyze security --threshold uses the 0-100 scale (exposure x10): 20 means "at most 2.0".
MAX_EXPOSURE = 2.0
EXPOSURE_RE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")

Entry = tuple[str, str, str]


def systemd_analyze() -> str:
    """Return the systemd-analyze path, failing (not skipping) when it is missing."""
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail(
            "systemd-analyze not found: the unit file cannot be checked. "
            "Install it with `apt-get install -y systemd` (CI does this in .ci/run)."
        )
    return path


def analyze(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run systemd-analyze with colours and pager off."""
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        [systemd_analyze(), *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def stage(tmp_path: Path, text: str) -> Path:
    """Write a unit copy whose ExecStart binary exists, so verify can check everything else."""
    # verify fails on a missing ExecStart binary; /bin/true is world-executable (runs as nobody).
    unit = tmp_path / "gpu-router.service"
    unit.write_text(text.replace(BINARY, "/bin/true"))
    return unit


def verify(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    """Run `systemd-analyze verify --man=no` on a staged copy of the unit text."""
    return analyze(["verify", "--man=no", str(stage(tmp_path, text))])


def security(tmp_path: Path, text: str, threshold: int) -> subprocess.CompletedProcess[str]:
    """Run the offline `systemd-analyze security` scan on a staged copy of the unit text."""
    unit = stage(tmp_path, text)
    return analyze(["security", "--offline=true", f"--threshold={threshold}", "--no-pager", str(unit)])


def exposure(result: subprocess.CompletedProcess[str]) -> float:
    """Parse the "Overall exposure level" figure from security output."""
    match = EXPOSURE_RE.search(result.stdout + result.stderr)
    assert match is not None, f"no exposure figure in output:\n{result.stdout}\n{result.stderr}"
    return float(match.group(1))


def parse_unit(text: str) -> list[Entry]:
    """Parse a unit into (section, key, value) entries, keeping repeated keys in order."""
    entries: list[Entry] = []
    section = ""
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        assert "=" in line, f"line {lineno} is neither a section, a comment nor key=value: {raw!r}"
        assert not line.endswith("\\"), f"line {lineno}: no continuation lines, keep keys greppable"
        key, value = line.split("=", 1)
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(entries: list[Entry], section: str, key: str) -> list[str]:
    """All values of one key in one section, in file order."""
    return [v for s, k, v in entries if s == section and k == key]


def one(entries: list[Entry], section: str, key: str) -> str:
    """The single value of a key that must appear exactly once."""
    found = values(entries, section, key)
    assert len(found) == 1, f"[{section}] {key}= expected once, found {found}"
    return found[0]


@pytest.fixture(scope="module")
def unit_text() -> str:
    """The unit file as shipped."""
    return UNIT.read_text()


@pytest.fixture(scope="module")
def entries(unit_text: str) -> list[Entry]:
    """The parsed unit file."""
    return parse_unit(unit_text)


def test_verify_is_clean(tmp_path: Path, unit_text: str) -> None:
    """Verify exits 0 and prints nothing: rc alone misses unknown keys and bad values."""
    result = verify(tmp_path, unit_text)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("ProtectSystem=strict", "ProtectSytem=strict", "Unknown key"),
        ("PrivateDevices=no", "PrivateDevices=no   # inline", "Failed to parse boolean"),
        ("Restart=on-failure", "Restart=sometimes", "restart specifier"),
    ],
)
def test_verify_helper_reports_broken_units(
    tmp_path: Path, unit_text: str, old: str, new: str, message: str
) -> None:
    """Negative control: these mistakes exit 0 but leave stderr, which the clean check rejects."""
    assert old in unit_text
    result = verify(tmp_path, unit_text.replace(old, new, 1))
    assert result.stderr != ""
    assert message in result.stderr


def test_security_exposure_at_most_2(tmp_path: Path, unit_text: str) -> None:
    """The offline security scan passes the 2.0 threshold, and the parsed figure agrees."""
    result = security(tmp_path, unit_text, threshold=round(MAX_EXPOSURE * 10))
    assert result.returncode == 0, result.stdout + result.stderr
    assert exposure(result) <= MAX_EXPOSURE


def test_security_threshold_can_fail(tmp_path: Path) -> None:
    """Negative control: an unhardened unit scores high and fails the same threshold."""
    bare = f"[Service]\nType=notify\nExecStart={BINARY} --config {CONFIG}\n"
    result = security(tmp_path, bare, threshold=round(MAX_EXPOSURE * 10))
    assert result.returncode != 0
    assert exposure(result) > MAX_EXPOSURE


def test_parser_keeps_repeated_keys() -> None:
    """The helper parser keeps duplicate keys in order (configparser would drop all but one)."""
    parsed = parse_unit("[Service]\n# c\nA=1\nA=2\n\n[Install]\nA=3\n")
    assert values(parsed, "Service", "A") == ["1", "2"]
    assert values(parsed, "Install", "A") == ["3"]


def test_sections(entries: list[Entry]) -> None:
    """Only the three standard sections, and the service is wanted by multi-user.target."""
    assert {s for s, _, _ in entries} == {"Unit", "Service", "Install"}
    assert one(entries, "Install", "WantedBy") == "multi-user.target"


def test_no_inline_comments(unit_text: str) -> None:
    """systemd has no inline comments: `key=value # note` becomes part of the value."""
    for section, key, value in parse_unit(unit_text):
        assert "#" not in value, f"[{section}] {key}={value!r} looks like an inline comment"


def test_notify_and_watchdog(entries: list[Entry]) -> None:
    """The daemon speaks sd_notify from its main process and pings the watchdog."""
    assert one(entries, "Service", "Type") == "notify"
    assert one(entries, "Service", "NotifyAccess") == "main"
    watchdog = one(entries, "Service", "WatchdogSec")
    match = re.fullmatch(r"(\d+)(s|min)?", watchdog)
    assert match is not None, watchdog
    seconds = int(match.group(1)) * (60 if match.group(2) == "min" else 1)
    # An Ollama model load can take a minute or more; the watchdog must outlast it.
    assert seconds >= 60


def test_exec_lines(entries: list[Entry]) -> None:
    """ExecStart runs the venv binary; ExecReload validates the config before sending SIGHUP."""
    assert one(entries, "Service", "ExecStart") == f"{BINARY} --config {CONFIG}"
    reload = values(entries, "Service", "ExecReload")
    assert reload == [f"{BINARY} --config {CONFIG} --check-config", "/bin/kill -HUP $MAINPID"]


def test_restart_policy(entries: list[Entry]) -> None:
    """Failures restart, but exit 78 (EX_CONFIG, a bad config) does not loop."""
    assert one(entries, "Service", "Restart") == "on-failure"
    assert "78" in one(entries, "Service", "RestartPreventExitStatus").split()


def test_environment_and_directories(entries: list[Entry]) -> None:
    """Unbuffered output for journald; config and state directories managed by systemd."""
    assert "PYTHONUNBUFFERED=1" in " ".join(values(entries, "Service", "Environment")).split()
    assert one(entries, "Service", "ConfigurationDirectory") == "gpu-router"
    assert one(entries, "Service", "StateDirectory") == "gpu-router"


def test_hardening_keeps_nvml_working(entries: list[Entry]) -> None:
    """Hardened, yet NVML's device nodes, /proc and sd_notify's AF_UNIX stay reachable."""
    assert one(entries, "Service", "DynamicUser") == "yes"
    assert one(entries, "Service", "ProtectSystem") == "strict"
    assert one(entries, "Service", "ProtectHome") == "yes"
    assert one(entries, "Service", "NoNewPrivileges") == "yes"
    assert one(entries, "Service", "DevicePolicy") == "closed"
    assert one(entries, "Service", "PrivateDevices") == "no"
    assert set(values(entries, "Service", "DeviceAllow")) == {
        "char-nvidiactl rw",
        "char-nvidia-frontend rw",
        "char-nvidia-caps rw",
    }
    assert set(one(entries, "Service", "RestrictAddressFamilies").split()) == {
        "AF_INET",
        "AF_INET6",
        "AF_UNIX",
    }
    assert values(entries, "Service", "SystemCallFilter")
    assert one(entries, "Service", "CapabilityBoundingSet") == ""
    # ProcSubset=pid hides /proc/meminfo and /proc/driver/nvidia; PrivateUsers breaks video-group devices.
    assert values(entries, "Service", "ProcSubset") in ([], ["all"])
    assert values(entries, "Service", "PrivateUsers") in ([], ["no"])


def test_missing_systemd_analyze_fails_not_skips(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without systemd-analyze the checks fail loudly instead of skipping silently."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="systemd-analyze not found"):
        systemd_analyze()
