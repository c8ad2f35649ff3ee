"""Tests for install.sh, run against a copy of the source tree and staged into tmp roots (--root)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "install.sh"
UNIT_REL = Path("etc/systemd/system/gpu-router.service")
CONFIG_REL = Path("etc/gpu-router/config.yaml")
EXAMPLE_REL = Path("etc/gpu-router/config.yaml.example")
# Used only when config/config.yaml is not in the repo yet; never written into the repo.
STAND_IN_CONFIG = "# stand-in example config for install tests\nnodes: []\n"

SYSTEMCTL_INSTALL = ["daemon-reload", "enable gpu-router.service", "try-restart gpu-router.service"]
SYSTEMCTL_UNINSTALL = ["disable --now gpu-router.service", "daemon-reload"]


def make_src(tmp_path: Path, *, package: bool = False) -> Path:
    """Copy install.sh, the unit, the example config (and optionally the package) into tmp_path/src."""
    src = tmp_path / "src"
    (src / "systemd").mkdir(parents=True)
    (src / "config").mkdir()
    shutil.copy2(SCRIPT, src / "install.sh")
    shutil.copy2(REPO / "systemd" / "gpu-router.service", src / "systemd" / "gpu-router.service")
    config = REPO / "config" / "config.yaml"
    if config.is_file():
        shutil.copy2(config, src / "config" / "config.yaml")
    else:
        (src / "config" / "config.yaml").write_text(STAND_IN_CONFIG)
    if package:
        shutil.copy2(REPO / "pyproject.toml", src / "pyproject.toml")
        readme = REPO / "README.md"
        if readme.is_file():
            shutil.copy2(readme, src / "README.md")
        else:
            (src / "README.md").write_text("gpu-router\n")
        shutil.copytree(
            REPO / "gpu_router",
            src / "gpu_router",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"),
        )
    return src


def write_exe(path: Path, text: str) -> Path:
    """Write an executable script."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def run_install(
    src: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the copied install.sh with args; PYTHON is unset unless env sets it."""
    base = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    return subprocess.run(
        [str(src / "install.sh"), *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        timeout=timeout,
        check=False,
    )


def files_under(root: Path) -> set[str]:
    """Relative paths of all non-directories under root."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


def mode(path: Path) -> int:
    """Permission bits of path."""
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A copy of the installable source tree (no Python package)."""
    return make_src(tmp_path)


@pytest.fixture
def fake_systemctl(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """Env with a logging `systemctl` first on PATH, and the log path."""
    log = tmp_path / "systemctl.log"
    bindir = tmp_path / "fakebin"
    write_exe(bindir / "systemctl", '#!/bin/sh\necho "$*" >> "$FAKE_LOG"\n')
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log)}
    return env, log


def logged(log: Path) -> list[str]:
    """Lines the fake systemctl logged (empty when it never ran)."""
    return log.read_text().splitlines() if log.exists() else []


def require_tool(name: str, package: str) -> str:
    """Return the tool's path, failing (not skipping) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install it with `apt-get install -y {package}` (CI does this).")
    return path


def test_script_is_executable() -> None:
    """install.sh ships with the executable bit."""
    assert mode(SCRIPT) & 0o111 == 0o111


def test_bash_syntax() -> None:
    """`bash -n` parses the script."""
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_shellcheck_clean() -> None:
    """shellcheck reports nothing, not even info-level notes."""
    shellcheck = require_tool("shellcheck", "shellcheck")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_missing_shellcheck_fails_not_skips(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without shellcheck the lint check fails loudly instead of skipping silently."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="shellcheck not found"):
        require_tool("shellcheck", "shellcheck")


def test_staged_install_creates_exactly_the_files(tmp_path: Path, src: Path) -> None:
    """--root --no-venv installs the unit, config and example, all 0644, and skips systemctl."""
    root = tmp_path / "root"
    result = run_install(src, "--root", str(root), "--no-venv")
    assert result.returncode == 0, result.stderr
    assert files_under(root) == {str(UNIT_REL), str(CONFIG_REL), str(EXAMPLE_REL)}
    for rel in (UNIT_REL, CONFIG_REL, EXAMPLE_REL):
        assert mode(root / rel) == 0o644, rel
    assert (root / UNIT_REL).read_bytes() == (src / "systemd" / "gpu-router.service").read_bytes()
    example = (src / "config" / "config.yaml").read_bytes()
    assert (root / CONFIG_REL).read_bytes() == example
    assert (root / EXAMPLE_REL).read_bytes() == example
    assert mode(root / "etc" / "gpu-router") == 0o755
    assert "systemctl skipped" in result.stderr
    for step in ("systemctl enable --now gpu-router", "journalctl -u gpu-router -f", "--report-only"):
        assert step in result.stderr
    assert result.stdout == ""


def test_rerun_keeps_config_and_refreshes_example(tmp_path: Path, src: Path) -> None:
    """A second run keeps the edited config byte for byte but refreshes the example and the unit."""
    root = tmp_path / "root"
    assert run_install(src, "--root", str(root), "--no-venv").returncode == 0
    edited = b"# edited by the admin\nnodes:\n  - url: http://127.0.0.1:11434\n"
    (root / CONFIG_REL).write_bytes(edited)
    new_example = (src / "config" / "config.yaml").read_text() + "# new key in this release\n"
    (src / "config" / "config.yaml").write_text(new_example)
    unit_src = src / "systemd" / "gpu-router.service"
    unit_src.write_text(unit_src.read_text().replace("RestartSec=10s", "RestartSec=11s"))

    result = run_install(src, "--root", str(root), "--no-venv")
    assert result.returncode == 0, result.stderr
    assert (root / CONFIG_REL).read_bytes() == edited
    assert (root / EXAMPLE_REL).read_text() == new_example
    assert "RestartSec=11s" in (root / UNIT_REL).read_text()
    assert "keeping existing" in result.stderr


def test_uninstall_keeps_config_and_purge_removes_it(tmp_path: Path, src: Path) -> None:
    """--uninstall removes the unit and /opt but keeps /etc/gpu-router; --purge removes it and state."""
    root = tmp_path / "root"
    assert run_install(src, "--root", str(root), "--no-venv").returncode == 0
    (root / "opt" / "gpu-router" / "venv" / "bin").mkdir(parents=True)
    state = root / "var" / "lib" / "private" / "gpu-router"
    state.mkdir(parents=True)

    result = run_install(src, "--root", str(root), "--uninstall")
    assert result.returncode == 0, result.stderr
    assert not (root / UNIT_REL).exists()
    assert not (root / "opt" / "gpu-router").exists()
    assert (root / CONFIG_REL).is_file()
    assert (root / EXAMPLE_REL).is_file()
    assert state.is_dir()

    result = run_install(src, "--root", str(root), "--uninstall", "--purge")
    assert result.returncode == 0, result.stderr
    assert not (root / "etc" / "gpu-router").exists()
    assert not state.exists()
    assert files_under(root) == set()


@pytest.mark.parametrize(
    "args",
    [["--bogus"], ["--purge"], ["--root"], ["--root", ""], ["--no-venv", "extra"]],
    ids=["unknown-flag", "purge-without-uninstall", "root-without-dir", "root-empty", "positional"],
)
def test_bad_arguments_exit_2_with_usage(tmp_path: Path, src: Path, args: list[str]) -> None:
    """Bad arguments print usage on stderr and exit 2 before touching anything."""
    result = run_install(src, *args)
    assert result.returncode == 2, result.stderr
    assert "Usage: install.sh" in result.stderr
    assert result.stdout == ""


def test_help_goes_to_stdout(src: Path) -> None:
    """-h prints usage on stdout and exits 0."""
    result = run_install(src, "-h")
    assert result.returncode == 0
    assert "Usage: install.sh" in result.stdout
    assert "--uninstall" in result.stdout


@pytest.fixture
def non_root_env(tmp_path: Path) -> dict[str, str]:
    """Env whose `id -u` reports 1000: install.sh decides root-ness with `id -u`."""
    bindir = tmp_path / "fake-id"
    real_id = shutil.which("id") or "/usr/bin/id"
    write_exe(bindir / "id", f'#!/bin/sh\nif [ "$1" = -u ]; then echo 1000; else exec {real_id} "$@"; fi\n')
    return {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}


def test_refuses_without_root(tmp_path: Path, non_root_env: dict[str, str]) -> None:
    """Without root and without --root, install and uninstall refuse with a clear message."""
    # A tree with no unit or config: were the root check ever skipped, the script would stop
    # at "missing ..." instead of writing to the live /etc of whoever runs the tests.
    hollow = tmp_path / "hollow"
    hollow.mkdir()
    shutil.copy2(SCRIPT, hollow / "install.sh")
    for args in ([], ["--uninstall"]):
        result = run_install(hollow, *args, "--no-venv", "--no-systemctl", env=non_root_env)
        assert result.returncode == 1, result.stderr
        assert "must run as root" in result.stderr


def test_staging_does_not_need_root(tmp_path: Path, src: Path, non_root_env: dict[str, str]) -> None:
    """--root works for an unprivileged user (same fake `id`)."""
    root = tmp_path / "root"
    result = run_install(src, "--root", str(root), "--no-venv", env=non_root_env)
    assert result.returncode == 0, result.stderr
    assert (root / UNIT_REL).is_file()


def test_systemctl_calls_in_order(
    tmp_path: Path, src: Path, fake_systemctl: tuple[dict[str, str], Path]
) -> None:
    """--systemctl runs daemon-reload, enable, try-restart; uninstall runs disable --now, daemon-reload."""
    env, log = fake_systemctl
    root = tmp_path / "root"
    result = run_install(src, "--root", str(root), "--no-venv", "--systemctl", env=env)
    assert result.returncode == 0, result.stderr
    assert logged(log) == SYSTEMCTL_INSTALL

    log.unlink()
    result = run_install(src, "--root", str(root), "--uninstall", "--systemctl", env=env)
    assert result.returncode == 0, result.stderr
    assert logged(log) == SYSTEMCTL_UNINSTALL


@pytest.mark.parametrize(
    "flags",
    [[], ["--no-systemctl"], ["--systemctl", "--no-systemctl"]],
    ids=["staging-implies-no", "no-systemctl", "last-flag-wins"],
)
def test_systemctl_not_called(
    tmp_path: Path, src: Path, fake_systemctl: tuple[dict[str, str], Path], flags: list[str]
) -> None:
    """Staging or --no-systemctl never calls systemctl, on install or uninstall."""
    env, log = fake_systemctl
    root = tmp_path / "root"
    assert run_install(src, "--root", str(root), "--no-venv", *flags, env=env).returncode == 0
    assert run_install(src, "--root", str(root), "--uninstall", *flags, env=env).returncode == 0
    assert logged(log) == []


def test_uninstall_tolerates_failing_disable(tmp_path: Path, src: Path) -> None:
    """A second uninstall (unit already gone, so disable fails) still succeeds with a warning."""
    log = tmp_path / "systemctl.log"
    bindir = tmp_path / "fakebin"
    write_exe(
        bindir / "systemctl",
        '#!/bin/sh\necho "$*" >> "$FAKE_LOG"\n[ "$1" = disable ] && exit 1\nexit 0\n',
    )
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log)}
    result = run_install(src, "--root", str(tmp_path / "root"), "--uninstall", "--systemctl", env=env)
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr
    assert logged(log) == SYSTEMCTL_UNINSTALL


def test_venv_steps_with_fake_python(tmp_path: Path, src: Path) -> None:
    """PYTHON builds the venv, pip installs a clean source copy, and a home-dir Python gets a warning."""
    log = tmp_path / "python.log"
    tree = tmp_path / "pip-tree.log"
    # Stands in for a pyenv interpreter: reports a base prefix under /home; `-m venv DIR` copies
    # itself to DIR/bin/python so the venv's pip call is logged too, with the tree it was given.
    fake = write_exe(
        tmp_path / "fakepy" / "python3",
        "#!/bin/bash\n"
        'echo "$0 $*" >> "$FAKE_LOG"\n'
        'last="${*: -1}"\n'
        'if [ "$1" = -c ]; then echo /home/alice/.pyenv/versions/3.11.7; fi\n'
        'if [ "$1" = -m ] && [ "$2" = venv ]; then mkdir -p "$last/bin"; cp "$0" "$last/bin/python"; fi\n'
        'if [ "$1" = -m ] && [ "$2" = pip ]; then\n'
        '  (cd "$last" && find . -mindepth 1 | sort) > "$FAKE_TREE"\n'
        "fi\n",
    )
    # Build leftovers and VCS data in the checkout must not reach the build.
    for junk in ("build/lib/gpu_router/removed.py", ".git/HEAD", "gpu_router.egg-info/PKG-INFO"):
        (src / junk).parent.mkdir(parents=True, exist_ok=True)
        (src / junk).write_text("junk\n")
    root = tmp_path / "root"
    env = {"PYTHON": str(fake), "FAKE_LOG": str(log), "FAKE_TREE": str(tree)}
    result = run_install(src, "--root", str(root), env=env)
    assert result.returncode == 0, result.stderr
    assert "ProtectHome" in result.stderr
    venv = root / "opt" / "gpu-router" / "venv"
    lines = log.read_text().splitlines()
    assert f"{fake} -m venv --clear {venv}" in lines
    pip_lines = [line for line in lines if line.startswith(f"{venv}/bin/python -m pip install")]
    assert len(pip_lines) == 1
    assert " --upgrade " in pip_lines[0]
    copied = set(tree.read_text().splitlines())
    assert {"./install.sh", "./systemd/gpu-router.service", "./config/config.yaml"} <= copied
    assert not {p for p in copied if p.startswith(("./build", "./.git", "./gpu_router.egg-info"))}
    build_dir = pip_lines[0].rsplit(" ", 1)[1]
    assert not Path(build_dir).exists(), "the temporary build copy must be removed on exit"

    # Second run: the venv exists and works, so it is reused and only pip runs again.
    log.unlink()
    assert run_install(src, "--root", str(root), env=env).returncode == 0
    lines = log.read_text().splitlines()
    assert not [line for line in lines if " -m venv " in line]
    assert len([line for line in lines if " -m pip install " in line]) == 1


def test_venv_creation_failure_is_reported(tmp_path: Path, src: Path) -> None:
    """A Python without a working venv module stops the install with a hint, before any file is placed."""
    fake = write_exe(
        tmp_path / "fakepy" / "python3",
        '#!/bin/sh\nif [ "$1" = -c ]; then echo /usr; exit 0; fi\nexit 1\n',
    )
    root = tmp_path / "root"
    result = run_install(src, "--root", str(root), env={"PYTHON": str(fake)})
    assert result.returncode == 1
    assert "python3-venv" in result.stderr
    assert not (root / UNIT_REL).exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_venv_install(tmp_path: Path) -> None:
    """A real venv install (deps from PyPI) gives a working `gpu-router --help`; a re-run upgrades."""
    src = make_src(tmp_path, package=True)
    root = tmp_path / "root"
    result = run_install(src, "--root", str(root), timeout=540)
    assert result.returncode == 0, result.stderr
    venv = root / "opt" / "gpu-router" / "venv"
    binary = venv / "bin" / "gpu-router"
    help_run = subprocess.run(
        [str(binary), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert help_run.returncode == 0, help_run.stderr
    assert "--config" in help_run.stdout
    if Path("/usr/bin/python3").is_file():
        # The default interpreter is the system one, so ProtectHome=yes cannot hide the venv's base.
        assert "home = /usr/bin" in (venv / "pyvenv.cfg").read_text()

    # The staged tree works once copied elsewhere (a package puts it at /): nothing in the venv's
    # bin/ names the staging directory, and the command runs from the new place.
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved, symlinks=True)
    shutil.rmtree(root / "opt")
    for script in (moved / "opt" / "gpu-router" / "venv" / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            assert str(root) not in script.read_text(errors="replace"), script
    moved_run = subprocess.run(
        [str(moved / "opt" / "gpu-router" / "venv" / "bin" / "gpu-router"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert moved_run.returncode == 0, moved_run.stderr
    assert moved_run.stdout.startswith("gpu-router ")
    shutil.rmtree(moved)
    result = run_install(src, "--root", str(root), timeout=540)
    assert result.returncode == 0, result.stderr

    marker = "# reinstalled by the second run\n"
    init = src / "gpu_router" / "__init__.py"
    init.write_text(init.read_text() + marker)
    result = run_install(src, "--root", str(root), timeout=540)
    assert result.returncode == 0, result.stderr
    installed = list(venv.glob("lib/python3*/site-packages/gpu_router/__init__.py"))
    assert len(installed) == 1
    assert installed[0].read_text().endswith(marker)
    # The build ran on a temporary copy: no build/ or egg-info left in the source tree.
    assert not (src / "build").exists()
    assert not list(src.glob("*.egg-info"))
