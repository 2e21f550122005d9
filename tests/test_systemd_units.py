"""The systemd units in systemd/: systemd's own checker, their exposure score, and what comfyd relies on.

``systemd-analyze verify`` checks every unit against a stub root (``--root``) holding the units, a copy of the
host's standard units and stand-ins for the programs the units start, so nothing is installed on the host.
It prints problems (an unknown key, a bad value) as warnings and still exits 0, so any line naming one of
our units fails the test. CI needs Debian's ``systemd`` package for ``systemd-analyze``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from comfyd.config import ServerConfig

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
UNIT_FILES = ("comfyd.service", "comfyui@.service", "comfyui.target")
HOST_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None,
    reason="systemd-analyze is not installed (Debian/Ubuntu: apt-get install -y systemd)",
)
# Programs the units start, which `verify` requires to exist and be executable inside --root.
EXECUTABLES = ("opt/comfyd/venv/bin/comfyd", "bin/sh")


def parse_unit(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> values in order (systemd keys may repeat). Enough for these files: no continuations."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return values


def one(unit: dict[str, list[str]], key: str) -> str:
    assert key in unit, f"{key} missing"
    assert len(unit[key]) == 1, f"{key} given {len(unit[key])} times"
    return unit[key][0]


def make_root(root: Path, units: dict[str, str] | None = None) -> Path:
    host_units = next((d for d in HOST_UNIT_DIRS if (d / "multi-user.target").exists()), None)
    if host_units is None:
        pytest.skip("no standard systemd units on this host (multi-user.target not found)")
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for name in UNIT_FILES:
        shutil.copy(UNITS / name, etc / name)
    for name, text in (units or {}).items():
        (etc / name).write_text(text)
    for exe in EXECUTABLES:
        stub = root / exe
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    return root


def analyze(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, *args[:1], f"--root={root}", *args[1:]],
        capture_output=True, text=True, timeout=60, cwd=root,
    )


def complaints(result: subprocess.CompletedProcess[str], names: tuple[str, ...]) -> list[str]:
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if any(name in line for name in names)]


@needs_analyze
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    # The template is checked through instances, as systemd would load it.
    result = analyze(root, "verify", "--man=no", "comfyd.service", "comfyui@0.service", "comfyui@7.service",
                     "comfyui.target")
    problems = complaints(result, ("comfyd", "comfyui"))
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


@needs_analyze
def test_verify_harness_catches_a_bad_unit(tmp_path: Path) -> None:
    """The check above can fail: a typo in a key and a bad value are reported against the unit."""
    broken = (UNITS / "comfyd.service").read_text().replace("NotifyAccess=main", "NotifyAcess=main")
    broken = broken.replace("WatchdogSec=30", "WatchdogSec=thirty")
    root = make_root(tmp_path / "root", {"comfyd.service": broken})
    result = analyze(root, "verify", "--man=no", "comfyd.service")
    problems = complaints(result, ("comfyd",))
    assert any("NotifyAcess" in line for line in problems), result.stderr
    assert any("thirty" in line for line in problems), result.stderr


@needs_analyze
def test_verify_requires_the_executables(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    (root / EXECUTABLES[0]).unlink()
    result = analyze(root, "verify", "--man=no", "comfyd.service")
    assert result.returncode != 0
    assert "/opt/comfyd/venv/bin/comfyd" in result.stderr


@needs_analyze
@pytest.mark.parametrize(("unit", "max_exposure"), [("comfyd.service", 2.5), ("comfyui@0.service", 4.5)])
def test_security_exposure_stays_low(tmp_path: Path, unit: str, max_exposure: float) -> None:
    """`systemd-analyze security` scores 0 (locked down) to 10 (unprotected); comfyd scores 1.9, ComfyUI 3.5."""
    probe = subprocess.run([ANALYZE, "security", "--help"], capture_output=True, text=True, timeout=30)
    if "--offline" not in probe.stdout:
        pytest.skip("this systemd-analyze has no `security --offline` (systemd < 250)")
    root = make_root(tmp_path / "root")
    result = analyze(root, "security", "--offline=true", "--no-pager", unit)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= max_exposure, result.stdout


def test_comfyd_unit_matches_what_comfyd_does() -> None:
    unit = parse_unit(UNITS / "comfyd.service")
    assert one(unit, "Service.Type") == "notify"  # comfyd.sdnotify sends READY=1
    assert one(unit, "Service.NotifyAccess") == "main"
    assert one(unit, "Service.ExecStart") == "/opt/comfyd/venv/bin/comfyd serve --config /etc/comfyd/comfyd.toml"
    assert one(unit, "Service.User") == one(unit, "Service.Group") == "comfyd"
    assert "Service.DynamicUser" not in unit
    assert one(unit, "Service.StateDirectory") == "comfyd"  # -> $STATE_DIRECTORY, comfyd's data dir
    assert one(unit, "Service.EnvironmentFile") == "-/etc/comfyd/comfyd.env"
    assert one(unit, "Service.Restart") == "on-failure"
    assert one(unit, "Service.KillSignal") == "SIGTERM"
    # systemd must not SIGKILL comfyd while it drains: the stop timeout outlasts the default drain deadline.
    assert int(one(unit, "Service.TimeoutStopSec")) > ServerConfig().drain_seconds
    assert int(one(unit, "Service.WatchdogSec")) >= 10
    assert one(unit, "Service.MemoryDenyWriteExecute") == "true"
    assert one(unit, "Service.ProtectSystem") == "strict"
    assert "-/srv/comfyui/output" in one(unit, "Service.ReadWritePaths").split()
    assert one(unit, "Service.SupplementaryGroups") == one(parse_unit(UNITS / "comfyui@.service"), "Service.Group")
    assert "comfyui.target" in one(unit, "Unit.After").split()
    assert one(unit, "Install.WantedBy") == "multi-user.target"


def comfyui_command(instance: str, tmp_path: Path) -> list[str]:
    """ExecStart of comfyui@<instance> as systemd would expand it, with a stand-in python that prints argv."""
    unit = parse_unit(UNITS / "comfyui@.service")
    exec_start = one(unit, "Service.ExecStart").replace("%i", instance).replace("$$", "$")
    argv = shlex.split(exec_start)
    assert argv[:2] == ["/bin/sh", "-c"], argv
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    script = argv[2].replace("/opt/comfyui/venv/bin/python", str(fake))
    return [argv[0], argv[1], script]


@pytest.mark.parametrize(
    ("instance", "env", "listen", "port", "extra"),
    [
        ("0", {}, "127.0.0.1", "8188", []),
        ("3", {}, "127.0.0.1", "8191", []),
        ("12", {}, "127.0.0.1", "8200", []),
        ("1", {"COMFYUI_PORT": "9300", "COMFYUI_LISTEN": "0.0.0.0"}, "0.0.0.0", "9300", []),
        ("2", {"COMFYUI_ARGS": "--highvram --preview-method auto"}, "127.0.0.1", "8190",
         ["--highvram", "--preview-method", "auto"]),
    ],
)
def test_comfyui_instance_port_scheme(
    tmp_path: Path, instance: str, env: dict[str, str], listen: str, port: str, extra: list[str]
) -> None:
    """comfyui@N listens on 8188 + N unless /etc/comfyd/comfyui-N.env sets COMFYUI_PORT."""
    unit = parse_unit(UNITS / "comfyui@.service")
    defaults = dict(value.split("=", 1) for value in unit["Service.Environment"])
    run_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        **defaults,
        "CACHE_DIRECTORY": f"/var/cache/comfyui/gpu{instance}",
        **env,
    }
    result = subprocess.run(comfyui_command(instance, tmp_path), env=run_env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    args = json.loads(result.stdout)
    assert args == [
        "/opt/comfyui/main.py", "--listen", listen, "--port", port, "--cuda-device", instance,
        "--output-directory", "/srv/comfyui/output", "--temp-directory", f"/var/cache/comfyui/gpu{instance}",
        "--disable-auto-launch", *extra,
    ]


def test_comfyui_instances_are_grouped_and_ordered_before_comfyd() -> None:
    unit = parse_unit(UNITS / "comfyui@.service")
    assert one(unit, "Unit.PartOf") == "comfyui.target"
    assert "comfyd.service" in one(unit, "Unit.Before").split()
    assert one(unit, "Install.WantedBy") == "comfyui.target"
    assert one(unit, "Service.Restart") == "on-failure"
    # CUDA needs what these would take away.
    for key in ("Service.PrivateDevices", "Service.MemoryDenyWriteExecute", "Service.DevicePolicy"):
        assert key not in unit, key
    assert one(parse_unit(UNITS / "comfyui.target"), "Install.WantedBy") == "multi-user.target"


MDWE_PROBE = textwrap.dedent("""
    import ctypes, errno, sys
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        sys.exit(77 if ctypes.get_errno() == errno.EINVAL else 1)
    import mmap
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        pass
    else:
        sys.exit("a writable+executable mapping was allowed: MDWE is not in force")

    import asyncio, sqlite3, ssl, hashlib
    import aiohttp, aiohttp.web, aiosqlite, msgspec, prometheus_client, prometheus_async, pynvml, structlog
    import comfyd.sdnotify

    # ctypes callbacks need libffi trampolines: the only W+X user in reach.
    compare = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))(
        lambda a, b: a[0] - b[0])
    values = (ctypes.c_int * 3)(3, 1, 2)
    libc.qsort(values, 3, ctypes.sizeof(ctypes.c_int), compare)
    assert list(values) == [1, 2, 3]
    try:
        pynvml.nvmlInit()  # on a GPU host this loads libnvidia-ml; elsewhere it fails cleanly
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        pass

    async def main():
        app = aiohttp.web.Application()
        async def hello(request):
            return aiohttp.web.json_response({"ok": True})
        app.router.add_get("/", hello)
        runner = aiohttp.web.AppRunner(app)
        await runner.setup()
        site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/") as response:
                assert (await response.json()) == {"ok": True}
        async with aiosqlite.connect(":memory:") as db:
            await db.execute("create table t (x)")
        await runner.cleanup()
    asyncio.run(main())
    print("ok")
""")


def test_comfyd_runtime_works_without_writable_executable_memory() -> None:
    """comfyd.service sets MemoryDenyWriteExecute=true; the kernel's PR_SET_MDWE enforces the same rule."""
    result = subprocess.run([sys.executable, "-c", MDWE_PROBE], capture_output=True, text=True, timeout=60,
                            cwd=REPO)
    if result.returncode == 77:
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3)")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr

