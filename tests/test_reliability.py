"""Upload limits, inference while training (atomic model swap) and the forgetting guard, on a real server.

One site: a published round-1 model and two phantom CTs. The tests run in file order: the 413s first
(nothing may change), then a continual round with inference hammering the server throughout (every
answer is exactly round 1's or round 2's output), then a full retraining that forgets the classes the
expert accepted, which the guard must refuse while round 2 stays published and served.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import nibabel as nib
import numpy as np
import pytest

from tests.live_server import LiveServer, prepare_site
from tests.test_server import CONF, REVISED, _expert_revision, _label

LIMIT_MB = 0.25
SITE_CONF = CONF | {"max_upload_mb": str(LIMIT_MB)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (locks and other dot files aside)."""
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def _saved(studies: Path) -> dict[str, str]:
    """Every saved label and its history."""
    return _tree(studies / "labels") | _tree(studies / "label_history")


def _train(live: LiveServer, params: dict) -> dict:
    """Start a round, wait until MONAI Label registers it, then until it ends; its status record."""
    live.client.train_start("unet", params)
    deadline = time.monotonic() + 60
    while not live.client.train_status(check_if_running=True):
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.05)
    return live.wait_for_training()


@pytest.fixture(scope="module")
def site(tiny_cohort: Path, round1_checkpoint: Path, tmp_path_factory) -> Iterator[tuple[LiveServer, Path]]:
    root = tmp_path_factory.mktemp("reliability")
    images = sorted((tiny_cohort / "images").glob("*.nii.gz"))[:2]
    with prepare_site(root, images, round1_checkpoint, SITE_CONF) as live:
        yield live, root


def _send(live: LiveServer, method: str, path: str, body, content_type: str) -> tuple[int, dict]:
    request = Request(f"{live.url}{path}", data=body, method=method, headers={"Content-Type": content_type})
    try:
        with urlopen(request, timeout=120) as response:  # a hang is a failure, not a stuck suite
            return response.status, json.loads(response.read() or b"{}")
    except HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _multipart(field: str, payload: bytes) -> tuple[bytes, str]:
    boundary = "revsegupload"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="big.nii.gz"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + payload + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_oversized_uploads_get_413_and_nothing_changes(site, tmp_path: Path):
    live, _ = site
    image_id = sorted(p.name.removesuffix(".nii.gz") for p in live.studies.glob("*.nii.gz"))[0]
    noise = tmp_path / "noise.nii.gz"  # incompressible: about 1 MB on disk, four times the limit
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((64, 64, 64), dtype=np.float32), np.eye(4)), str(noise))
    assert noise.stat().st_size > 2 * LIMIT_MB * 2**20
    body, content_type = _multipart("label", noise.read_bytes())
    before = _saved(live.studies)

    status, answer = _send(live, "PUT", f"/datastore/label?image={image_id}&tag=final", body, content_type)
    assert status == 413 and image_id in answer["detail"] and "max_upload_mb" in answer["detail"], answer
    infer_body, infer_type = _multipart("file", noise.read_bytes())
    status, answer = _send(live, "POST", "/infer/unet?output=json", infer_body, infer_type)
    assert status == 413 and "/infer/unet" in answer["detail"], answer

    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))  # no Content-Length: chunked transfer
    status, answer = _send(live, "PUT", f"/datastore/label?image={image_id}&tag=final", chunks, content_type)
    assert status == 413 and "max_upload_mb" in answer["detail"], answer

    just_over = body[:int(LIMIT_MB * 2**20) + 1000]  # the chunk that crosses the limit is also the last one
    status, answer = _send(live, "PUT", f"/datastore/label?image={image_id}&tag=final",
                           (just_over[i:i + 2**17] for i in range(0, len(just_over), 2**17)), content_type)
    assert status == 413, answer

    assert live.client.info()["name"] == "revseg", "the server keeps serving"
    assert _saved(live.studies) == before, "nothing saved changed"
    assert not (live.studies / "labels" / "final" / f"{image_id}.nii.gz").exists()


def _submit_revision(live: LiveServer, cohort: Path, tmp_path: Path) -> tuple[str, np.ndarray]:
    """An expert accepts the AI's label except for two classes, which get their true extent."""
    image_id = sorted(p.name.removesuffix(".nii.gz") for p in live.studies.glob("*.nii.gz"))[0]
    original_file, _ = live.client.infer("unet", image_id, {"save_label": True, "label_tag": "original"})
    original = _label(original_file)
    expert = _expert_revision(original, _label(str(cohort / "labels_gt" / f"{image_id}.nii.gz")))
    reference = nib.load(str(live.studies / f"{image_id}.nii.gz"))
    path = tmp_path / f"{image_id}.nii.gz"
    nib.save(nib.Nifti1Image(expert.astype(np.uint8), reference.affine), str(path))
    live.client.save_label(image_id, str(path), tag="final")
    return image_id, original


class InferenceLoad:
    """Infer one image over and over from a thread; keeps (round, label map, training running?) per answer."""

    def __init__(self, live: LiveServer, image_id: str):
        self.live, self.image_id = live, image_id
        self.answers: list[tuple[int, np.ndarray, bool]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _training(self) -> bool:
        return bool(self.live.client.train_status(check_if_running=True))

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                running_before = self._training()
                path, params = self.live.client.infer("unet", self.image_id, {})
                running = running_before and self._training()
                self.answers.append((int(params["published"]["round"]), _label(path), running))
            except Exception as error:  # every failure is a finding: collect, assert later
                self.errors.append(repr(error))

    def __enter__(self) -> InferenceLoad:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=120)


def test_inference_answers_during_training_and_the_swap_is_atomic(site, tiny_cohort: Path, tmp_path: Path):
    live, _ = site
    image_id, _ = _submit_revision(live, tiny_cohort, tmp_path)
    round1_file, params = live.client.infer("unet", image_id, {})
    assert params["published"]["round"] == 1
    round1 = _label(round1_file)

    with InferenceLoad(live, image_id) as load:
        status = _train(live, {"max_epochs": 3, "lr": 0.05})
        after, deadline = len(load.answers), time.monotonic() + 120
        while len(load.answers) < after + 1 and not load.errors:  # at least one answer from the new model
            assert time.monotonic() < deadline, "no inference answered after training"
            load.stop.wait(0.5)
    assert status["status"] == "DONE", status
    assert not load.errors, load.errors[:3]
    round2_file, params = live.client.infer("unet", image_id, {})
    assert params["published"]["round"] == 2
    round2 = _label(round2_file)
    assert not np.array_equal(round1, round2), "round 2 changed the revised classes"

    rounds = [r for r, _, _ in load.answers]
    assert any(r == 1 and running for r, _, running in load.answers), \
        f"no inference answered while training ran ({len(rounds)} answers in all)"
    assert rounds == sorted(rounds), "round 1 serves until round 2 is published, then round 2 only"
    for served_round, label, _ in load.answers:
        expected = {1: round1, 2: round2}[served_round]
        assert np.array_equal(label, expected), f"an answer labelled round {served_round} is not its model's output"
    assert load.answers[-1][0] == 2


def test_forgetting_guard_refuses_a_round_that_forgets(site, tmp_path: Path):
    """Full retraining from scratch on one revised case loses what the expert accepted: refused."""
    live, root = site
    published = live.client.info()["train_stats"]["unet"]["published"]
    models_before = _tree(root / "models")
    image_id = sorted(p.name.removesuffix(".nii.gz") for p in live.studies.glob("*.nii.gz"))[0]
    served_before, _ = live.client.infer("unet", image_id, {})
    served_before_label = _label(served_before)

    status = _train(live, {"mode": "full", "max_epochs": 2})
    assert status["status"] == "DONE", status

    stats = live.client.info()["train_stats"]["unet"]
    last, guard = stats["last_train"], stats["last_train"]["forgetting_guard"]
    assert last["mode"] == "full" and last["published"] is False, last
    assert "forgetting guard" in last["reason"] and guard["worst_class"] in last["reason"]
    assert guard["checked"] and not guard["passed"] and guard["failed_classes"]
    assert all(drop > guard["margin"] for drop in guard["failed_classes"].values())
    assert not set(guard["failed_classes"]) & set(REVISED), "only classes nobody revised are guarded"
    assert stats["published"] == published, "the previous model stays published"
    assert {k: v for k, v in _tree(root / "models").items() if "last_train" not in k} == \
        {k: v for k, v in models_before.items() if "last_train" not in k}, "model files untouched"
    served_after, params = live.client.infer("unet", image_id, {})
    assert params["published"]["round"] == published["round"]
    assert np.array_equal(_label(served_after), served_before_label)

    status = _train(live, {"mode": "full", "max_epochs": 1, "forgetting_margin": 1})  # an admin accepts the loss
    assert status["status"] == "DONE", status
    stats = live.client.info()["train_stats"]["unet"]
    assert stats["last_train"]["published"] and stats["last_train"]["forgetting_guard"]["passed"]
    assert stats["published"]["round"] == published["round"] + 1
