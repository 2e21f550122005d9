"""The output index: foreign files, remote backends (no shared disk), paging, deletion."""

from __future__ import annotations

import os
import time

from comfyd.actors.indexer import Rescan
from tests.harness import Comfyd, workflow


async def test_foreign_file_is_indexed_as_unknown_and_attributed_in_workflow_folders(comfyd: Comfyd,
                                                                                    standin) -> None:
    done = await comfyd.submit(workflow("quick"))
    await comfyd.wait_end(done)
    outputs = comfyd.service.config.outputs_dir
    stray = outputs / "made_in_comfyui_ui_00001_.png"
    stray.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    extra = outputs / done / "extra.txt"
    extra.write_text("notes")
    old = time.time() - 60
    for path in (stray, extra):
        os.utime(path, (old, old))
    added, removed = await comfyd.service.indexer.ask(Rescan(), 10)
    assert (added, removed) == (2, 0)
    status, body = await comfyd.request("GET", "/v1/comfyui/outputs?limit=10")
    by_name = {o["filename"]: o for o in body["outputs"]}
    assert by_name["made_in_comfyui_ui_00001_.png"]["workflowId"] == "unknown"
    assert by_name["made_in_comfyui_ui_00001_.png"]["type"] == "image"
    assert by_name[f"{done}/extra.txt"]["workflowId"] == done and by_name[f"{done}/extra.txt"]["type"] == "other"
    assert len([o for o in body["outputs"] if o["workflowId"] == done]) == 2
    # a second scan adds nothing; a file removed by hand leaves the index, and its job's list
    stray.unlink()
    assert await comfyd.service.indexer.ask(Rescan(), 10) == (0, 1)
    [made] = (await comfyd.get(done))["outputs"]
    (outputs / made["filename"]).unlink()
    assert await comfyd.service.indexer.ask(Rescan(), 10) == (0, 1)
    assert (await comfyd.get(done))["outputs"] == []


async def test_remote_backend_outputs_are_fetched_through_view(standin, comfyd_factory, tmp_path) -> None:
    comfyd: Comfyd = await comfyd_factory([standin], outputs=tmp_path / "comfyd-outputs")
    for executor in comfyd.service.executors.values():
        executor.config.shared_outputs = False
    workflow_id = await comfyd.submit(workflow("quick", **{"1.color": 99}))
    end = await comfyd.wait_end(workflow_id)
    [output] = end["outputs"]
    local = tmp_path / "comfyd-outputs" / output["filename"]
    remote = standin.output_dir / output["filename"]
    assert local.read_bytes() == remote.read_bytes()
    async with comfyd.http.get(comfyd.url + output["url"]) as response:
        assert response.status == 200 and await response.read() == remote.read_bytes()


async def test_pages_chain_and_delete(comfyd: Comfyd, standin) -> None:
    ids = [await comfyd.submit(workflow("quick", **{"1.color": 300 + n})) for n in range(7)]
    for workflow_id in ids:
        await comfyd.wait_end(workflow_id)
    seen, cursor = [], None
    while True:
        query = "limit=3" + (f"&cursor={cursor}" if cursor else "")
        status, page = await comfyd.request("GET", f"/v1/comfyui/outputs?{query}")
        assert status == 200
        seen += [o["filename"] for o in page["outputs"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 7
    assert [s.split("/")[0] for s in seen] == list(reversed(ids))  # newest first
    status, body = await comfyd.request("DELETE", f"/v1/comfyui/outputs/{seen[0]}")
    assert status == 200 and body["deleted"] is True
    assert not (comfyd.service.config.outputs_dir / seen[0]).exists()
    status, body = await comfyd.request("GET", f"/v1/comfyui/outputs?workflowId={ids[-1]}")
    assert body["outputs"] == []
    assert (await comfyd.get(ids[-1]))["outputs"] == []  # its job no longer lists it either
    assert len((await comfyd.get(ids[-2]))["outputs"]) == 1  # and the neighbours keep theirs
    assert (await comfyd.request("DELETE", f"/v1/comfyui/outputs/{seen[0]}"))[0] == 404
    assert (await comfyd.request("DELETE", "/v1/comfyui/outputs/..%2F..%2Fetc%2Fpasswd"))[0] in (400, 404)


async def test_models_listed_with_hashes(standin, comfyd_factory, tmp_path) -> None:
    import hashlib

    models = tmp_path / "models"
    (models / "checkpoints" / "sdxl").mkdir(parents=True)
    (models / "upscale_models").mkdir(parents=True)
    (models / "checkpoints" / "sdxl" / "base.safetensors").write_bytes(b"weights" * 1000)
    (models / "upscale_models" / "4x.pth").write_bytes(b"up" * 10)
    (models / "checkpoints" / "notes.txt").write_text("not a model")
    comfyd: Comfyd = await comfyd_factory([standin], models=models)
    status, body = await comfyd.request("GET", "/v1/comfyui/models?type=checkpoints")
    assert status == 200 and [m["name"] for m in body["models"]] == ["sdxl/base.safetensors"]
    await comfyd.service.models.wait_hashed(10)
    status, body = await comfyd.request("GET", "/v1/comfyui/models")
    names = {(m["type"], m["name"]): m for m in body["models"]}
    assert set(names) == {("checkpoints", "sdxl/base.safetensors"), ("upscale", "4x.pth")}
    model = names[("checkpoints", "sdxl/base.safetensors")]
    assert model["size"] == 7000 and model["hash"] == hashlib.sha256(b"weights" * 1000).hexdigest()
    assert model["autov2"] == model["hash"][:10]
    status, body = await comfyd.request("GET", "/v1/comfyui/models?type=embeddings")
    assert status == 400 and body["field"] == "type"
