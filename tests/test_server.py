"""The sequence 3D Slicer runs, against a real `monailabel start_server` process on 127.0.0.1.

info -> next sample (attention) -> infer (save_label) -> submit a label with two classes changed ->
exactly those two recorded as revised -> train (continual, 2 gloo processes) -> infer again with the
new model, whose output changes only in the revised classes. Plus bad uploads and a busy trainer.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from urllib.request import Request, urlopen

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from lib.classes import class_index
from tests.live_server import prepare_site

REVISED = ("aorta", "postcava")
CONF = {"models": "unet", "roi_size": "64", "spacing": "6", "overlap": "0", "train_epochs": "2",
        "train_processes": "2", "device": "cpu"}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def server(tiny_cohort: Path, round1_checkpoint: Path, tmp_path_factory):
    """A published round-1 model, a studies folder of phantom CTs, and a live server."""
    root = tmp_path_factory.mktemp("server")
    images = sorted((tiny_cohort / "images").glob("*.nii.gz"))[:3]
    with prepare_site(root, images, round1_checkpoint, CONF) as live:
        yield {"client": live.client, "studies": live.studies, "root": root, "cohort": tiny_cohort, "port": live.port}


def _label(path: str) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj).astype(np.int32)


def _expert_revision(original: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Replace two classes by their true extent, touching only background and the class itself."""
    expert = original.copy()
    for name in REVISED:
        value = class_index(name) + 1
        expert[(original == value) & (truth != value)] = 0
        expert[(truth == value) & ((original == 0) | (original == value))] = value
    return expert


def test_slicer_sequence(server, tmp_path: Path):
    client: MONAILabelClient = server["client"]
    info = client.info()
    unet = info["models"]["unet"]
    assert unet["labels"]["aorta"] == class_index("aorta") + 1 and len(unet["labels"]) == 32
    assert unet["label_colors"]["liver"] and "attention" in info["strategies"]
    assert info["train_stats"]["unet"]["published"]["round"] == 1

    scores = json.loads(_post(server, "/scoring/attention?run_sync=true"))
    assert scores["scored"] == 3 and not scores["failed"]
    assert json.loads(_post(server, "/scoring/attention?run_sync=true"))["skipped"] == 3, "unchanged: not rescored"
    sample = client.next_sample("attention", {})
    image_id = sample["id"]
    assert sample["priority"] >= 0 and image_id in {p.name.removesuffix(".nii.gz") for p in
                                                    server["studies"].glob("*.nii.gz")}

    original_file, params = client.infer("unet", image_id, {"save_label": True, "label_tag": "original"})
    original = _label(original_file)
    assert params["published"]["round"] == 1
    assert (server["studies"] / "labels" / "original" / f"{image_id}.nii.gz").is_file()

    truth = _label(str(server["cohort"] / "labels_gt" / f"{image_id}.nii.gz"))
    expert = _expert_revision(original, truth)
    reference = nib.load(str(server["studies"] / f"{image_id}.nii.gz"))
    expert_file = tmp_path / f"{image_id}.nii.gz"
    nib.save(nib.Nifti1Image(expert.astype(np.uint8), reference.affine), str(expert_file))
    client.save_label(image_id, str(expert_file), tag="final")

    label_info = json.loads(_get(server, f"/datastore/label/info?label={image_id}&tag=final"))
    assert label_info["revision"]["revised_classes"] == list(REVISED)
    assert set(label_info["revision"]["changes"]) == set(REVISED)

    client.train_start("unet", {"max_epochs": 2, "lr": 0.05})
    _wait_until_running(client)  # MONAI Label registers the task from a background thread
    with pytest.raises(MONAILabelClientException, match="Already Running"):
        client.train_start("unet", {"max_epochs": 2})
    _wait_for_training(client)
    stats = client.info()["train_stats"]["unet"]
    assert stats["published"]["round"] == 2 and stats["last_train"]["mode"] == "continual"
    assert stats["last_train"]["revised_classes"] == list(REVISED) and stats["last_train"]["world_size"] == 2

    new_file, new_params = client.infer("unet", image_id, {})
    assert new_params["published"]["round"] == 2
    new = _label(new_file)
    changed = new != original
    assert changed.any(), "the new model must change the revised classes' output"
    revised_values = [class_index(n) + 1 for n in REVISED]
    touches_revised = np.isin(original[changed], revised_values) | np.isin(new[changed], revised_values)
    assert touches_revised.all(), "every changed voxel belongs to a revised class before or after"


def _get(server, path: str) -> str:
    with urlopen(f"http://127.0.0.1:{server['port']}{path}") as response:
        return response.read().decode()


def _post(server, path: str) -> str:
    request = Request(f"http://127.0.0.1:{server['port']}{path}", data=b"{}", method="POST",
                      headers={"Content-Type": "application/json"})
    with urlopen(request) as response:
        return response.read().decode()


def _wait_until_running(client: MONAILabelClient, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if client.train_status(check_if_running=True):  # True once the task's process is registered
            return
        time.sleep(0.05)
    pytest.fail("training never started")


def _wait_for_training(client: MONAILabelClient, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    time.sleep(2)
    while time.time() < deadline:
        status = client.train_status()
        if status.get("status") in ("DONE", "ERROR"):
            assert status["status"] == "DONE", status.get("details", status)[-20:]
            return
        time.sleep(2)
    pytest.fail("training did not finish in time")


@pytest.mark.parametrize("kind", ["not_nifti", "wrong_shape", "bad_values"])
def test_bad_uploads_are_refused_and_nothing_changes(server, tmp_path: Path, kind: str):
    client: MONAILabelClient = server["client"]
    studies: Path = server["studies"]
    image_id = sorted(p.name.removesuffix(".nii.gz") for p in studies.glob("case_*.nii.gz"))[-1]
    reference = nib.load(str(studies / f"{image_id}.nii.gz"))
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.full(reference.shape, 6, np.uint8), reference.affine), str(good))
    client.save_label(image_id, str(good), tag="final")
    final = studies / "labels" / "final" / f"{image_id}.nii.gz"
    before = (_sha(final), sorted(os.listdir(studies / "label_history" / image_id)))

    bad = tmp_path / f"bad_{kind}.nii.gz"
    if kind == "not_nifti":
        bad.write_bytes(b"this is not a volume")
    elif kind == "wrong_shape":
        nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), reference.affine), str(bad))
    else:
        nib.save(nib.Nifti1Image(np.full(reference.shape, 99, np.uint8), reference.affine), str(bad))
    with pytest.raises(MONAILabelClientException) as raised:
        client.save_label(image_id, str(bad), tag="final")
    message = str(raised.value.msg)
    assert "Status: 422" in message and image_id in message
    assert {"not_nifti": "not a readable", "wrong_shape": "shape", "bad_values": "outside the class template"}[kind] \
        in message
    assert client.info()["name"] == "revseg", "the server keeps serving"
    assert (_sha(final), sorted(os.listdir(studies / "label_history" / image_id))) == before


def _status(server, method: str, path: str, **kwargs) -> tuple[int, dict]:
    """HTTP status and JSON body of one request, whatever the status."""
    from urllib.error import HTTPError

    request = Request(f"http://127.0.0.1:{server['port']}{path}", method=method, **kwargs)
    try:
        with urlopen(request) as response:
            return response.status, json.loads(response.read() or b"{}")
    except HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _multipart(field: str, filename: str, payload: bytes, params: str | None = None) -> dict:
    boundary = "revsegboundary"
    parts = []
    if params is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{params}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + payload + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return {"data": b"".join(parts), "headers": {"Content-Type": f"multipart/form-data; boundary={boundary}"}}


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, tmp_path: Path) -> bytes:
    path = tmp_path / f"v{np.random.randint(1 << 30)}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path.read_bytes()


def test_bad_requests_get_4xx_with_a_message(server, tmp_path: Path):
    studies: Path = server["studies"]
    image_id = sorted(p.name.removesuffix(".nii.gz") for p in studies.glob("case_*.nii.gz"))[0]
    reference = nib.load(str(studies / f"{image_id}.nii.gz"))
    shape, affine = reference.shape, reference.affine
    labels_before = {p: _sha(p) for p in (studies / "labels").rglob("*.nii.gz")}
    truncated = (studies / f"{image_id}.nii.gz").read_bytes()[:2000]
    nan = np.zeros(shape, np.float32)
    nan[0, 0, 0] = np.nan
    cases = {
        "truncated label": ("PUT", f"/datastore/label?image={image_id}&tag=final",
                            _multipart("label", "x.nii.gz", truncated), 422, "not a readable"),
        "4D label": ("PUT", f"/datastore/label?image={image_id}&tag=final",
                     _multipart("label", "x.nii.gz", _nifti_bytes(np.ones((*shape, 2), np.uint8), affine, tmp_path)),
                     422, "3D"),
        "affine mismatch": ("PUT", f"/datastore/label?image={image_id}&tag=final",
                            _multipart("label", "x.nii.gz", _nifti_bytes(np.ones(shape, np.uint8), affine * 2,
                                                                          tmp_path)), 422, "affine differs"),
        "NaN label": ("PUT", f"/datastore/label?image={image_id}&tag=final",
                      _multipart("label", "x.nii.gz", _nifti_bytes(nan, affine, tmp_path)), 422, "NaN"),
        "empty label": ("PUT", f"/datastore/label?image={image_id}&tag=final",
                        _multipart("label", "x.nii.gz", _nifti_bytes(np.zeros(shape, np.uint8), affine, tmp_path)),
                        422, "empty"),
        "unknown image": ("PUT", "/datastore/label?image=no_such_case&tag=final",
                          _multipart("label", "x.nii.gz", _nifti_bytes(np.ones(shape, np.uint8), affine, tmp_path)),
                          404, "no_such_case"),
        "traversal id": ("POST", "/infer/unet?image=..%2F..%2Fetc%2Fpasswd&output=json", {}, 422, "invalid image id"),
        "absolute id": ("POST", "/infer/unet?image=%2Fetc%2Fpasswd&output=json", {}, 422, "invalid image id"),
        "unknown model": ("POST", f"/infer/nonexistent?image={image_id}&output=json", {}, 404, "nonexistent"),
        "unknown strategy": ("POST", "/activelearning/nonexistent", {"data": b"{}", "headers":
                             {"Content-Type": "application/json"}}, 404, "nonexistent"),
        "malformed params": ("POST", f"/infer/unet?image={image_id}&output=json",
                             _multipart("file", "x.nii.gz", b"", params="{not json"), 400, "malformed JSON"),
        "NaN image": ("POST", "/infer/unet?output=json",
                      _multipart("file", "scan.nii.gz", _nifti_bytes(nan, affine, tmp_path)), 422, "NaN"),
        "non-image upload": ("POST", "/infer/unet?output=json", _multipart("file", "scan.nii.gz", b"hello"), 422,
                             "not a readable"),
    }
    for name, (method, path, kwargs, expected, message) in cases.items():
        status, body = _status(server, method, path, **kwargs)
        assert status == expected, f"{name}: {status} {body}"
        assert message in body.get("detail", ""), f"{name}: {body}"
    assert _status(server, "GET", "/info/")[0] == 200, "the server keeps serving"
    assert {p: _sha(p) for p in (studies / "labels").rglob("*.nii.gz")} == labels_before, "nothing saved changed"


def test_parallel_inference_and_submissions(server, tmp_path: Path):
    from concurrent.futures import ThreadPoolExecutor

    client: MONAILabelClient = server["client"]
    studies: Path = server["studies"]
    images = sorted(p.name.removesuffix(".nii.gz") for p in studies.glob("case_*.nii.gz"))
    files = {}
    for image_id in images:
        reference = nib.load(str(studies / f"{image_id}.nii.gz"))
        files[image_id] = tmp_path / f"{image_id}.nii.gz"
        nib.save(nib.Nifti1Image(np.full(reference.shape, 2, np.uint8), reference.affine), str(files[image_id]))
    with ThreadPoolExecutor(max_workers=2 * len(images)) as pool:
        infers = [pool.submit(client.infer, "unet", i, {}) for i in images]
        saves = [pool.submit(client.save_label, i, str(files[i]), "final") for i in images]
        assert all(f.result()[1]["model"] == "unet" for f in infers)
        assert all(f.result()["image"] in images for f in saves)
    for image_id in images:
        assert _sha(studies / "labels" / "final" / f"{image_id}.nii.gz") == _sha(files[image_id])
