"""The sequence 3D Slicer runs, against a real `monailabel start_server` process on 127.0.0.1.

info -> next sample (attention) -> infer (save_label) -> submit a label with two classes changed ->
exactly those two recorded as revised -> train (continual, 2 gloo processes) -> infer again with the
new model, whose output changes only in the revised classes. Plus bad uploads and a busy trainer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import Request, urlopen

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from lib.classes import class_index
from lib.model_store import ModelStore
from lib.paths import REPO_ROOT
from lib.trainers.train import main as train_main

REVISED = ("aorta", "postcava")
CONF = {"models": "unet", "roi_size": "64", "spacing": "6", "overlap": "0", "train_epochs": "2",
        "train_processes": "2", "device": "cpu"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def server(tiny_cohort: Path, tmp_path_factory):
    """A published round-1 model, a studies folder of phantom CTs, and a live server."""
    root = tmp_path_factory.mktemp("server")
    studies = root / "studies"
    studies.mkdir()
    for image in sorted((tiny_cohort / "images").glob("*.nii.gz"))[:3]:
        shutil.copy(image, studies / image.name)
    assert train_main(["--data_root_path", str(tiny_cohort), "--dataset_list", str(tiny_cohort / "train_gt.txt"),
                       "--run_dir", str(root / "round1"), "--width", "0.25", "--roi_x", "32", "--roi_y", "32",
                       "--roi_z", "32", "--space_x", "6", "--space_y", "6", "--space_z", "6", "--num_samples", "1",
                       "--max_epoch", "3", "--warmup_epoch", "1", "--lr", "3e-3", "--device", "cpu"]) == 0
    ModelStore(root / "models").publish("unet", root / "round1" / "checkpoints" / "last.pt", {"mode": "full"})

    port = _free_port()
    conf = {**CONF, "model_dir": str(root / "models"), "runs_dir": str(root / "runs")}
    cmd = [str(Path(sys.executable).parent / "monailabel"), "start_server", "--app", str(REPO_ROOT / "apps" / "revseg"),
           "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port)]
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                        "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed in teardown
    process = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    client = MONAILabelClient(f"http://127.0.0.1:{port}", tmpdir=str(root / "client"))
    deadline = time.time() + 180
    while True:
        try:
            client.info()
            break
        except Exception:
            if process.poll() is not None or time.time() > deadline:
                log.close()
                pytest.fail(f"server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
    yield {"client": client, "studies": studies, "root": root, "cohort": tiny_cohort, "port": port}
    process.terminate()
    process.wait(timeout=30)
    log.close()


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
