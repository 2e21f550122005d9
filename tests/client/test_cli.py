"""The ``comfyd`` client commands against comfyd running in-process on loopback (and the stand-in ComfyUI).

Most run in-process through ``run_cli``; one runs the installed ``comfyd`` script as a real process while
this test's event loop serves comfyd.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from comfyd.client import run_cli
from comfyd.client.files import target_path
from comfyd.client.options import CliError
from comfyd.client.progress import ProgressView
from comfyd.store.migrations import MIGRATIONS
from tests.harness import API_KEY, WORKFLOWS, Comfyd, make_config, workflow

COMFYD_SCRIPT = Path(sys.executable).parent / "comfyd"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


async def cli(comfyd: Comfyd | str, *argv: str, key: str = API_KEY, stdin: str = "",
              env: dict[str, str] | None = None) -> Result:
    url = comfyd if isinstance(comfyd, str) else comfyd.url
    out, err = io.StringIO(), io.StringIO()
    code = await run_cli(["--url", url, "--api-key", key, *argv], stdout=out, stderr=err,
                         stdin=io.StringIO(stdin), env=env or {})
    return Result(code, out.getvalue(), err.getvalue())


def dead_url() -> str:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def quick(n: int) -> dict:
    return workflow("quick", **{"1.color": 2000 + n})


# -- submit ---------------------------------------------------------------------------------------------------
async def test_submit_wait_prints_progress_and_output_url(comfyd: Comfyd) -> None:
    result = await cli(comfyd, "submit", str(WORKFLOWS / "quick.json"), "--wait", "--priority", "high")
    assert result.code == 0, result.err
    first, *urls = result.out.splitlines()
    workflow_id = first.split()[0]
    assert first == f"{workflow_id}  queued, position 0"
    [url] = urls
    assert url.startswith(f"{comfyd.url}/v1/comfyui/output/{workflow_id}/peer_quick_") and url.endswith(".png")
    assert "started on gpu0" in result.err and "] 100% SaveImage" in result.err and "completed in" in result.err
    async with comfyd.http.get(url) as response:
        assert response.status == 200 and (await response.read()).startswith(b"\x89PNG")
    assert (await comfyd.get(workflow_id))["priority"] == "high"


async def test_submit_wait_failed_job_exits_1_with_the_error(comfyd: Comfyd) -> None:
    result = await cli(comfyd, "submit", str(WORKFLOWS / "fail_exec.json"), "--wait")
    assert result.code == 1
    assert "failed (node_error)" in result.err and "Sizes of tensors must match" in result.err
    assert "/v1/comfyui/output/" not in result.out


async def test_submit_wait_as_a_real_process(comfyd: Comfyd) -> None:
    env = {**os.environ, "COMFYD_URL": comfyd.url, "MANAGEMENT_API_KEY": f"{API_KEY},another-key"}
    process = await asyncio.create_subprocess_exec(
        str(COMFYD_SCRIPT), "submit", str(WORKFLOWS / "quick.json"), "--wait", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].endswith("queued, position 0") and lines[1].endswith(".png")
    progress = err.decode().splitlines()  # not a TTY: plain lines, no carriage returns
    assert "\r" not in err.decode() and any(line.endswith("100% SaveImage") for line in progress)


async def test_submit_body_from_stdin_and_json_output(comfyd: Comfyd) -> None:
    body = json.dumps({"workflow": quick(1), "priority": "low"})
    result = await cli(comfyd, "--json", "submit", "-", "--idempotency-key", "k-1", stdin=body)
    assert result.code == 0, result.err
    accepted = result.json()
    assert accepted["status"] == "queued" and accepted["queuePosition"] == 0
    workflow_id = accepted["workflowId"]
    assert (await comfyd.wait_end(workflow_id))["type"] == "workflow:completed"
    again = await cli(comfyd, "submit", "-", "--idempotency-key", "k-1", "--json", stdin=body)
    assert again.json()["workflowId"] == workflow_id
    job = await comfyd.get(workflow_id)
    assert job["priority"] == "low"


async def test_submit_wait_json_prints_the_final_status(comfyd: Comfyd) -> None:
    result = await cli(comfyd, "submit", str(WORKFLOWS / "quick.json"), "--wait", "--json")
    assert result.code == 0, result.err
    job = result.json()
    assert job["status"] == "completed" and job["outputs"][0]["type"] == "image"
    assert result.err == ""  # no progress when stdout is for machines and stderr is no TTY


async def test_submit_rejects_bad_input(comfyd: Comfyd, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = await cli(comfyd, "submit", str(bad))
    assert result.code == 2 and result.err.startswith(f"comfyd: {bad} is not valid JSON")
    assert (await cli(comfyd, "submit", str(tmp_path / "missing.json"))).code == 2
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": []}))
    result = await cli(comfyd, "submit", str(ui))
    assert result.code == 2 and "UI format" in result.err
    result = await cli(comfyd, "submit", str(WORKFLOWS / "quick.json"), "--gpu", "salad")
    assert result.code == 2 and "no backend is configured for gpu pool 'salad'" in result.err
    result = await cli(comfyd, "submit")
    assert result.code == 2 and "the following arguments are required: FILE" in result.err


# -- status, cancel, list --------------------------------------------------------------------------------------
async def test_status_table_and_json(comfyd: Comfyd) -> None:
    workflow_id = await comfyd.submit(quick(2))
    await comfyd.wait_end(workflow_id)
    table = await cli(comfyd, "status", workflow_id)
    assert table.code == 0
    assert f"workflowId   {workflow_id}" in table.out and "status       completed" in table.out
    assert "progress     100%" in table.out and f"output  {comfyd.url}/v1/comfyui/output/{workflow_id}/" in table.out
    as_json = await cli(comfyd, "status", workflow_id[:8], "--json")  # a prefix of a recent id will do
    assert as_json.code == 0 and as_json.json()["workflowId"] == workflow_id


async def test_status_and_cancel_of_an_unknown_id_exit_4(comfyd: Comfyd) -> None:
    for command in ("status", "cancel"):
        result = await cli(comfyd, command, "00000000-0000-0000-0000-000000000000")
        assert result.code == 4 and result.err == "comfyd: Workflow 00000000-0000-0000-0000-000000000000 not found\n"


async def test_cancel_running_wait_exits_3_and_cancel_again_is_a_conflict(comfyd: Comfyd, standin) -> None:
    standin.hold()
    waiting = asyncio.create_task(cli(comfyd, "submit", str(WORKFLOWS / "quick.json"), "--wait"))
    await standin.wait_for(lambda: standin.held is not None, timeout=10)
    [job] = await comfyd.service.jobs.recent(1)
    cancel = asyncio.create_task(cli(comfyd, "cancel", job.id))
    await standin.wait_for(lambda: len(standin.interrupt_calls) == 1, timeout=10)
    standin.release()
    cancelled = await cancel
    assert (cancelled.code, cancelled.out) == (0, f"{job.id}  cancelled\n")
    waited = await waiting
    assert waited.code == 3 and f"workflow {job.id} was cancelled" in waited.err
    again = await cli(comfyd, "cancel", job.id)
    assert again.code == 5 and again.err == "comfyd: Workflow cannot be cancelled: it is cancelled\n"


async def test_list_newest_first_with_filters(comfyd: Comfyd) -> None:
    done = await comfyd.submit(quick(3))
    await comfyd.wait_end(done)
    failed = await comfyd.submit(workflow("fail_exec"))
    await comfyd.wait_end(failed)
    table = await cli(comfyd, "list")
    assert table.code == 0
    header, first, second = table.out.splitlines()
    assert header.split() == ["ID", "STATUS", "PRIORITY", "GPU", "PROGRESS", "NODE", "AGE"]
    assert first.split()[:4] == [failed[:8], "failed", "normal", "local"]
    assert second.split()[:6] == [done[:8], "completed", "normal", "local", "100%", "SaveImage"]
    only = (await cli(comfyd, "list", "--status", "completed", "--limit", "5", "--json")).json()
    assert [j["workflowId"] for j in only["workflows"]] == [done]
    assert (await cli(comfyd, "list", "--status", "bogus")).code == 2
    status, body = await comfyd.request("GET", "/v1/comfyui/workflows?status=bogus")
    assert status == 400 and body["field"] == "status"
    status, body = await comfyd.request("GET", "/v1/comfyui/workflows?limit=1")
    assert status == 200 and [j["workflowId"] for j in body["workflows"]] == [failed]


# -- outputs, models, backends ---------------------------------------------------------------------------------
async def test_outputs_lists_and_downloads(comfyd: Comfyd, standin, tmp_path: Path) -> None:
    workflow_id = await comfyd.submit(quick(4))
    await comfyd.wait_end(workflow_id)
    listing = await cli(comfyd, "outputs", "--workflow", workflow_id)
    header, row = listing.out.splitlines()
    assert header.split() == ["FILENAME", "TYPE", "SIZE", "CREATED"]
    assert row.startswith(f"{workflow_id}/peer_quick_") and row.split()[1] == "image"
    target = tmp_path / "downloads"
    result = await cli(comfyd, "outputs", "--workflow", workflow_id, "--download", str(target), "--json")
    assert result.code == 0, result.err
    [item] = result.json()["outputs"]
    written = target / item["filename"]
    assert item["path"] == str(written.resolve())
    assert written.read_bytes() == (standin.output_dir / item["filename"]).read_bytes()
    assert written.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in written.parent.iterdir()] == [written.name]  # no .part file left behind
    again = await cli(comfyd, "outputs", "--workflow", workflow_id, "--download", str(target))
    assert again.code == 0 and "downloaded" not in again.err  # already there with the same sha256


def test_download_never_writes_outside_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "dl"
    root.mkdir()
    (root / "escape").symlink_to(tmp_path)
    assert target_path(root, "abc/x.png") == root.resolve() / "abc" / "x.png"
    for name in ("../x.png", "/etc/passwd", "a/../../x.png", "escape/x.png", "", "."):
        with pytest.raises(CliError, match="refusing to write"):
            target_path(root, name)


async def test_models_table_with_short_hash(standin, tmp_path: Path) -> None:
    checkpoints = standin.models_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "tiny.safetensors").write_bytes(b"x" * 2048)
    (standin.models_dir / "loras").mkdir()
    (standin.models_dir / "loras" / "style.safetensors").write_bytes(b"y" * 10)
    config = make_config(tmp_path, [standin.url])
    config.paths.models = str(standin.models_dir)
    config.paths.outputs = str(standin.output_dir)
    app = await Comfyd(config).start()
    try:
        await app.service.models.wait_hashed(10)
        result = await cli(app, "models")
        assert result.code == 0
        header, checkpoint, lora = result.out.splitlines()
        assert header.split() == ["NAME", "TYPE", "SIZE", "HASH"]
        autov2 = hashlib.sha256(b"x" * 2048).hexdigest()[:10]
        assert checkpoint.split() == ["tiny.safetensors", "checkpoints", "2.0", "KiB", autov2]
        assert lora.split() == ["style.safetensors", "loras", "10", "B", hashlib.sha256(b"y" * 10).hexdigest()[:10]]
        only = (await cli(app, "models", "--type", "loras", "--json")).json()
        assert [m["name"] for m in only["models"]] == ["style.safetensors"]
        assert (await cli(app, "models", "--type", "bogus")).code == 2
    finally:
        await app.stop()


async def test_backends_table_and_json(comfyd: Comfyd, standin) -> None:
    result = await cli(comfyd, "backends")
    header, row = result.out.splitlines()
    assert header.split()[:6] == ["NAME", "URL", "POOL", "GPU", "STATE", "JOBS"]
    assert row.split()[:6] == ["gpu0", standin.url, "local", "0", "up", "-"]
    [backend] = (await cli(comfyd, "backends", "--json")).json()["backends"]
    assert backend["state"] == "up" and backend["lastError"] is None


# -- connection failures ---------------------------------------------------------------------------------------
async def test_wrong_api_key_exits_7(comfyd: Comfyd) -> None:
    result = await cli(comfyd, "backends", key="wrong")
    assert result.code == 7 and result.err.startswith("comfyd: invalid API key")
    result = await cli(comfyd, "submit", str(WORKFLOWS / "quick.json"), "--wait", key="wrong")
    assert result.code == 7  # refused at the stream's handshake


async def test_unreachable_comfyd_exits_6() -> None:
    url = dead_url()
    for argv in (["list"], ["submit", str(WORKFLOWS / "quick.json"), "--wait"]):
        result = await cli(url, *argv)
        assert result.code == 6 and result.err.startswith(f"comfyd: cannot reach comfyd at {url}")


async def test_url_must_be_http() -> None:
    result = await cli("ftp://example", "list")
    assert (result.code, result.err) == (2, "comfyd: --url must start with http:// or https://, not 'ftp://example'\n")


# -- doctor ----------------------------------------------------------------------------------------------------
def write_config(path: Path, comfyd: Comfyd, backend_url: str) -> Path:
    config = comfyd.config
    path.write_text(f"""
[auth]
api_keys = ["{API_KEY}"]
[paths]
data_dir = "{config.data_dir}"
outputs = "{config.outputs_dir}"
[[backends]]
url = "{backend_url}"
name = "gpu0"
""")
    return path


async def test_doctor_all_good(comfyd: Comfyd, standin, tmp_path: Path) -> None:
    config = write_config(tmp_path / "comfyd.toml", comfyd, standin.url)
    result = await cli(comfyd, "doctor", "--config", str(config))
    assert result.code == 0, result.out
    lines = {line.split()[1] if not line.startswith(("ok    backend", "FAIL  backend")) else "backend": line
             for line in result.out.splitlines()}
    assert lines["config"].startswith(f"ok    config          loaded {config}")
    assert lines["database"].startswith("ok")
    assert f"schema version {len(MIGRATIONS)} (current), journal mode wal" in lines["database"]
    assert lines["outputs"].startswith("ok")
    assert lines["backend"].startswith("ok    backend gpu0") and "ComfyUI 0.3.64" in lines["backend"]
    assert lines["nvml"].split()[0] in ("ok", "warn")
    assert lines["service"].startswith("ok") and "1/1 backends up" in lines["service"]
    assert lines["api"].startswith("ok    api key         accepted")
    report = (await cli(comfyd, "doctor", "--config", str(config), "--json")).json()
    assert report["ok"] is True and {c["check"] for c in report["checks"]} >= {"config", "database", "backend gpu0"}


async def test_doctor_fails_on_a_dead_backend_and_a_bad_key(comfyd: Comfyd, tmp_path: Path) -> None:
    config = write_config(tmp_path / "comfyd.toml", comfyd, dead_url())
    result = await cli(comfyd, "doctor", "--config", str(config), key="wrong")
    assert result.code == 1
    [backend] = [line for line in result.out.splitlines() if "backend gpu0" in line]
    assert backend.startswith("FAIL  backend gpu0") and "is unreachable" in backend and "→ start that ComfyUI" in backend
    assert any(line.startswith("FAIL  api key         the service rejects this API key")
               for line in result.out.splitlines())


async def test_doctor_reports_a_bad_config_and_no_service(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = 0\n")
    result = await cli(dead_url(), "doctor", "--config", str(bad))
    assert result.code == 1
    assert result.out.startswith("FAIL  config          server.port must be 1-65535")
    assert any(line.startswith("FAIL  service") and "→ start it" in line for line in result.out.splitlines())


# -- the progress bar ------------------------------------------------------------------------------------------
class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_redraws_with_eta() -> None:
    now = [100.0]
    stream = Tty()
    view = ProgressView(stream, tty=True, clock=lambda: now[0], columns=80)
    view.update({"type": "workflow:queued", "queuePosition": 2})
    view.update({"type": "workflow:started", "backend": "gpu0"})
    now[0] += 9
    view.update({"type": "workflow:progress", "progress": 45.0, "currentNode": "KSampler"})
    view.close()
    frames = stream.getvalue().split("\r")
    assert frames[1].rstrip() == "queued, position 2"
    assert frames[2].rstrip() == "started on gpu0"
    assert frames[3] == "[#########-----------]  45% KSampler  ETA 11s\n"
    assert view.elapsed() == 9


def test_progress_plain_lines_when_not_a_tty() -> None:
    stream = io.StringIO()
    view = ProgressView(stream, tty=False)
    for event in ({"type": "workflow:queued", "queuePosition": 0}, {"type": "workflow:started", "backend": "gpu0"},
                  *({"type": "workflow:progress", "progress": p, "currentNode": "KSampler"} for p in (50, 55, 59, 61)),
                  {"type": "workflow:completed", "outputs": []}):
        view.update(event)
    assert stream.getvalue().splitlines() == ["queued, position 0", "started on gpu0",  # a line per node or 10%
                                              "[##########----------]  50% KSampler",
                                              "[############--------]  61% KSampler",
                                              "[####################] 100% KSampler"]


async def test_help_lists_the_exit_codes() -> None:
    out = io.StringIO()
    assert await run_cli(["submit", "--help"], stdout=out, stderr=io.StringIO()) == 0
    assert "7  unauthorized" in out.getvalue() and "--wait" in out.getvalue()
    err = io.StringIO()
    assert await run_cli(["serve"], stdout=io.StringIO(), stderr=err) == 2
