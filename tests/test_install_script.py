"""scripts/install.sh, run into a throwaway DESTDIR: what it creates, what a re-run keeps, what --uninstall removes.

In DESTDIR mode the script must not touch the host: useradd, chown, systemctl and friends are replaced by stubs
on PATH that record any call and fail, and every test checks that none was made. One test builds the real
virtualenv (pip install --no-deps of this tree: a few seconds, PyPI only for the build backend); the others use
--no-venv and take well under a second.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "scripts" / "install.sh"
DEV_RUN = REPO / "scripts" / "dev-run.sh"
SCRIPTS = (INSTALL, DEV_RUN)
SYSTEM_COMMANDS = ("useradd", "groupadd", "usermod", "userdel", "groupdel", "chown", "chgrp", "systemctl")
UNITS = ("comfyd.service", "comfyui@.service", "comfyui.target")
KEY_LINE = re.compile(r"^MANAGEMENT_API_KEY=([A-Za-z0-9_-]{32,})$", re.MULTILINE)


class Installer:
    def __init__(self, root: Path, stubs: Path) -> None:
        self.root = root
        self.stubs = stubs
        self.calls = stubs / "calls.log"

    def run(self, *args: str, destdir: bool = True, timeout: float = 50) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PATH": f"{self.stubs}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("DESTDIR", None)
        env.pop("COMFYD_PIP_ARGS", None)
        if destdir:
            env["DESTDIR"] = str(self.root)
        result = subprocess.run(["bash", str(INSTALL), *args], env=env, capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL)
        assert not self.calls.exists(), f"touched the host: {self.calls.read_text()}"
        return result

    def ok(self, *args: str, **kwargs: object) -> str:
        result = self.run(*args, **kwargs)  # type: ignore[arg-type]
        assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def mode(self, absolute: str) -> int:
        return stat.S_IMODE(self.path(absolute).stat().st_mode)

    def snapshot(self, skip: str = "/opt/comfyd/venv") -> dict[str, tuple[int, bytes | None]]:
        """Every file and folder with its mode and content, except the venv (pip rewrites it on every run)."""
        out: dict[str, tuple[int, bytes | None]] = {}
        for path in sorted(self.root.rglob("*")):
            rel = "/" + str(path.relative_to(self.root))
            if rel == skip or rel.startswith(skip + "/"):
                continue
            st = path.lstat()
            out[rel] = (st.st_mode, path.read_bytes() if path.is_file() else None)
        return out


@pytest.fixture
def installer(tmp_path: Path) -> Installer:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in SYSTEM_COMMANDS:
        stub = stubs / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{stubs}/calls.log"\nexit 97\n')
        stub.chmod(0o755)
    return Installer(tmp_path / "root", stubs)


def key_of(installer: Installer) -> str:
    keys = KEY_LINE.findall(installer.path("/etc/comfyd/comfyd.env").read_text())
    assert len(keys) == 1, keys
    return keys[0]


def assert_layout(inst: Installer) -> None:
    assert inst.mode("/opt/comfyd") == 0o755
    assert inst.mode("/etc/comfyd") == 0o750
    assert inst.mode("/etc/comfyd/comfyd.env") == 0o640
    assert inst.mode("/etc/comfyd/comfyd.toml") == 0o640
    assert inst.mode("/var/lib/comfyd") == 0o750
    assert inst.mode("/var/log/comfyd") == 0o750
    assert inst.mode("/srv/comfyui/output") == 0o2775  # setgid: files keep the comfyui group
    for unit in UNITS:
        assert inst.mode(f"/etc/systemd/system/{unit}") == 0o644
        assert inst.path(f"/etc/systemd/system/{unit}").read_bytes() == (REPO / "systemd" / unit).read_bytes()
    example = REPO / "config" / "comfyd.toml"
    toml = inst.path("/etc/comfyd/comfyd.toml").read_text()
    if example.exists():
        assert toml == example.read_text()
    else:
        assert toml.startswith("#")  # an empty config: built-in defaults
    env = inst.path("/etc/comfyd/comfyd.env").read_text()
    assert "COMFYUI_OUTPUTS=/srv/comfyui/output\n" in env
    key_of(inst)
    leftovers = [p.name for p in inst.path("/etc/comfyd").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary files from the atomic writes


@pytest.mark.timeout(300)
def test_install_reinstall_uninstall_purge_with_venv(installer: Installer) -> None:
    out = installer.ok("--pip-args", "--no-deps")
    assert_layout(installer)
    comfyd = installer.path("/opt/comfyd/venv/bin/comfyd")
    assert comfyd.is_file() and os.access(comfyd, os.X_OK)
    python = installer.path("/opt/comfyd/venv/bin/python")
    probe = subprocess.run([str(python), "-c", "import comfyd.sdnotify, comfyd; print(comfyd.__file__)"],
                           capture_output=True, text=True, timeout=30, cwd=installer.root)
    assert probe.returncode == 0, probe.stderr
    assert str(installer.path("/opt/comfyd/venv")) in probe.stdout  # the installed copy, not this checkout
    assert "would run: useradd --system --gid comfyd" in out
    assert "would run: chown root:comfyd" in out
    assert "would run: systemctl enable --now comfyd.service" in out

    # The operator edits the config; a re-run (an upgrade) must keep it, and the key, and change nothing else.
    key = key_of(installer)
    toml = installer.path("/etc/comfyd/comfyd.toml")
    toml.write_text(toml.read_text() + "\n# edited by the operator\n")
    before = installer.snapshot()
    out = installer.ok("--pip-args", "--no-deps")
    assert installer.snapshot() == before
    assert key_of(installer) == key
    assert "reusing /opt/comfyd/venv" in out
    assert "kept /etc/comfyd/comfyd.env" in out

    # An operator drop-in and instance links, as `systemctl edit` / `systemctl enable comfyui@0` make them.
    units = installer.path("/etc/systemd/system")
    (units / "comfyd.service.d").mkdir()
    (units / "comfyd.service.d" / "override.conf").write_text("[Service]\nEnvironment=X=1\n")
    (units / "comfyui.target.wants").mkdir()
    (units / "comfyui.target.wants" / "comfyui@0.service").symlink_to("/etc/systemd/system/comfyui@.service")

    out = installer.ok("--uninstall")
    for unit in UNITS:
        assert not (units / unit).exists()
    assert not (units / "comfyui.target.wants").exists()
    assert not installer.path("/opt/comfyd").exists()
    assert key_of(installer) == key  # config and key are kept
    assert toml.read_text().endswith("# edited by the operator\n")
    assert installer.path("/var/lib/comfyd").is_dir()
    assert installer.path("/srv/comfyui/output").is_dir()
    assert (units / "comfyd.service.d" / "override.conf").exists()  # operator config, kept without --purge
    assert "would run: systemctl disable --now comfyd.service" in out

    out = installer.ok("--uninstall", "--purge")
    for gone in ("/etc/comfyd", "/var/lib/comfyd", "/var/log/comfyd", "/etc/systemd/system/comfyd.service.d"):
        assert not installer.path(gone).exists(), gone
    assert installer.path("/srv/comfyui/output").is_dir()  # ComfyUI's outputs are never removed
    assert "would run: userdel comfyd" in out


def test_fast_install_without_venv_keeps_key_and_config(installer: Installer) -> None:
    installer.ok("--no-venv")
    assert_layout(installer)
    assert not installer.path("/opt/comfyd/venv").exists()
    key = key_of(installer)
    before = installer.snapshot()
    out = installer.ok("--no-venv")
    assert installer.snapshot() == before
    assert key_of(installer) == key
    assert "unchanged comfyd.service" in out


def test_each_install_generates_its_own_key(installer: Installer, tmp_path: Path) -> None:
    installer.ok("--no-venv")
    first = key_of(installer)
    other = Installer(tmp_path / "other-root", installer.stubs)
    other.ok("--no-venv")
    assert key_of(other) != first


def test_destdir_option_and_relative_path(installer: Installer, tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(INSTALL), "--no-venv", "--no-start", "--destdir", "relroot"],
        env={**os.environ, "PATH": f"{installer.stubs}{os.pathsep}{os.environ['PATH']}"},
        cwd=tmp_path, capture_output=True, text=True, timeout=50, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert not installer.calls.exists()
    assert (tmp_path / "relroot/etc/systemd/system/comfyd.service").exists()
    assert "would run: systemctl enable comfyd.service" in result.stdout  # --no-start: enable only


def test_existing_outputs_folder_is_left_alone(installer: Installer) -> None:
    outputs = installer.path("/srv/comfyui/output")
    outputs.mkdir(parents=True)
    outputs.chmod(0o750)
    (outputs / "ComfyUI_00001_.png").write_bytes(b"png")
    out = installer.ok("--no-venv")
    assert installer.mode("/srv/comfyui/output") == 0o750
    assert (outputs / "ComfyUI_00001_.png").read_bytes() == b"png"
    assert "kept /srv/comfyui/output" in out
    assert "chown comfyui:comfyui" not in out


def test_uninstall_of_nothing_is_harmless(installer: Installer) -> None:
    installer.ok("--uninstall")
    installer.ok("--purge")


def test_help_and_bad_options(installer: Installer) -> None:
    out = installer.ok("--help")
    for word in ("--uninstall", "--purge", "--destdir", "--no-venv", "--pip-args", "DESTDIR"):
        assert word in out
    assert not installer.root.exists()  # --help does nothing else
    bad = installer.run("--frobnicate")
    assert bad.returncode != 0
    assert "unknown option: --frobnicate" in bad.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    result = subprocess.run(["shellcheck", "--severity=style", str(script)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
