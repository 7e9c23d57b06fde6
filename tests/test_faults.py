"""Fault injection: SIGKILL at any moment never loses, tears or hides an expert's label or the served model.

Two levels, both with real processes and real SIGKILLs:

- crash-point sweeps (no server): a forked process saving a label, or publishing a model, is killed at
  each of its file-system steps in turn; after every crash a freshly opened datastore or model store
  (what a restarted server sees) holds the old state or the new one, never a torn or missing file;
- a real ``monailabel start_server`` process: killed at random moments while a several-MB label uploads
  and restarted on the same studies folder; training rounds killed at random moments (one rank, the whole
  task tree, or MONAI Label's own stop) leave the published model untouched and the next round publishes
  cleanly; a last restart keeps every label and every history version, byte for byte.

``REVSEG_FAULT_ROUNDS`` (default 4) sets the random server kills during uploads and, at least 3, the killed
training rounds; ``REVSEG_FAULT_SEED`` (default 0) the random moments. Soak: ``REVSEG_FAULT_ROUNDS=40``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.request import urlopen

import nibabel as nib
import numpy as np
import psutil
import pytest
import torch

from lib.atomic import PARTIAL_SUFFIX
from lib.classes import NUM_CLASSES, class_index
from lib.datastore import RevisionDatastore
from lib.model_store import ModelStore
from tests.crashpoints import sweep
from tests.live_server import LiveServer, kill_processes, prepare_site
from tests.test_server import CONF, REVISED, _expert_revision

ROUNDS = int(os.environ.get("REVSEG_FAULT_ROUNDS", "4"))
SEED = int(os.environ.get("REVSEG_FAULT_SEED", "0"))
FINAL = "final"
TRAIN_PROCESSES = int(CONF["train_processes"])


def _sha(path: Path) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_label(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write a uint8 label map as NIfTI (what Slicer uploads)."""
    nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), str(path))
    return path


@dataclass
class Ledger:
    """Every label payload the test sent per (image, tag), and which ones the server acknowledged."""

    sent: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    acked: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))

    def send(self, image: str, tag: str, payload: Path) -> str:
        digest = _sha(payload)
        self.sent[image, tag].append(digest)
        return digest

    def ack(self, image: str, tag: str, digest: str) -> None:
        self.acked[image, tag].append(digest)

    def allowed_current(self, image: str, tag: str) -> set[str]:
        """The current label may be the last acknowledged payload or any unacknowledged one sent after it."""
        sent, acked = self.sent[image, tag], self.acked[image, tag]
        after = sent[sent.index(acked[-1]) + 1:] if acked else sent
        return set(acked[-1:]) | set(after)


def label_problems(studies: Path, ledger: Ledger) -> list[str]:
    """Everything wrong with the labels on disk, as a freshly opened datastore sees them (empty: nothing lost)."""
    try:
        store = RevisionDatastore(str(studies))
    except Exception as error:  # a datastore that cannot open has lost everything
        return [f"datastore does not open: {type(error).__name__}: {error}"]
    problems = []
    if partials := sorted(p.name for p in studies.rglob(f".*{PARTIAL_SUFFIX}")):
        problems.append(f"temp files left after a restart: {partials}")
    images = set(store.list_images())
    if stray := set(store.get_labeled_images(FINAL)) - images:
        problems.append(f"labels without an image (temp files taken for labels?): {sorted(stray)}")
    for (image, tag), sent in ledger.sent.items():
        where = f"{image}/{tag}"
        current = Path(store.get_label_uri(image, tag) or studies / "labels" / tag / f"{image}.nii.gz")
        if not current.is_file():
            problems.append(f"{where}: current label missing")
            continue
        if _sha(current) not in ledger.allowed_current(image, tag):
            problems.append(f"{where}: current label is neither the old nor the new submission (torn?)")
        history = []
        for sidecar in sorted(store.history_dir(image).glob(f"{tag}_v*.json")):
            try:
                json.loads(sidecar.read_text())
            except ValueError:
                problems.append(f"{where}: sidecar {sidecar.name} does not parse")
        for label in sorted(store.history_dir(image).glob(f"{tag}_v*.nii.gz")):
            if not label.with_name(label.name.removesuffix(".nii.gz") + ".json").is_file():
                problems.append(f"{where}: history {label.name} has no sidecar (its version number will be reused)")
        for version in store.label_history(image, tag):
            path = Path(version["path"])
            digest = _sha(path) if path.is_file() else "missing"
            history.append(digest)
            if digest not in sent:
                problems.append(f"{where}: history v{version['version']} is not a submitted payload ({digest[:8]})")
        if missing := [d[:8] for d in ledger.acked[image, tag] if d not in history]:
            problems.append(f"{where}: acknowledged versions missing from the history: {missing}")
        info = store.get_label_info(image, tag)
        named = Path(info.get("history") or "missing")
        if info.get("history") and (not named.is_file() or _sha(named) != _sha(current)):
            problems.append(f"{where}: label info names version {info.get('version')}, not the file on disk")
        revision = info.get("revision")
        if tag == FINAL and revision and revision.get("version") != info.get("version"):
            problems.append(f"{where}: revision record of v{revision.get('version')} kept for v{info.get('version')}")
    return problems


# -------------------------------------------------------------------------------------------------
# Crash-point sweeps: every file-system step of a label save and of a model publish
# -------------------------------------------------------------------------------------------------


def test_label_save_survives_a_crash_at_every_step(tiny_cohort: Path, tmp_path: Path):
    """A final label replacing an older one, killed at each step: the old label or the new one, never less."""
    image_id = "case_0000"
    pristine, studies = tmp_path / "pristine", tmp_path / "studies"
    pristine.mkdir()
    shutil.copy(tiny_cohort / "images" / f"{image_id}.nii.gz", pristine)
    reference = nib.load(str(pristine / f"{image_id}.nii.gz"))
    original = np.asarray(nib.load(str(tiny_cohort / "labels_ai" / f"{image_id}.nii.gz")).dataobj)
    old, new = original.copy(), original.copy()
    old[original == class_index("liver") + 1] = 0
    new[original == class_index("spleen") + 1] = 0
    files = {name: _save_label(tmp_path / f"{name}.nii.gz", data, reference.affine)
             for name, data in {"original": original, "old": old, "new": new}.items()}
    ledger = Ledger()
    store = RevisionDatastore(str(pristine))
    store.save_label(image_id, str(files["original"]), "original", {})
    for tag, name in (("original", "original"), (FINAL, "old")):
        ledger.ack(image_id, tag, ledger.send(image_id, tag, files[name]))
    store.save_label(image_id, str(files["old"]), FINAL, {})
    store.record_revision(image_id, 1)
    ledger.send(image_id, FINAL, files["new"])

    def submit() -> None:
        """What one label PUT does to the disk: check, archive, replace, then record the revision."""
        datastore = RevisionDatastore(str(studies))
        datastore.save_label(image_id, str(files["new"]), FINAL, {})
        datastore.record_revision(image_id, 1)

    def reset() -> None:
        shutil.rmtree(studies, ignore_errors=True)
        shutil.copytree(pristine, studies)

    failures: list[str] = []
    result = sweep(submit, reset, lambda step, where: failures.extend(
        f"crash at step {step} ({where}): {p}" for p in label_problems(studies, ledger)))
    print(f"label save: {result.steps} file-system steps, {len(result.crashes)} crashes, {len(failures)} problems")
    assert result.steps > 5 and len(result.crashes) == result.steps
    assert not failures, "\n".join(failures)


def _store_problems(root: Path, rounds: dict[int, str]) -> list[str]:
    """A restarted model store serves exactly the round published.json names, and every round is archived."""
    try:
        store = ModelStore(root)
        record = store.info("unet")
    except Exception as error:
        return [f"model store does not open: {type(error).__name__}: {error}"]
    problems = []
    served, archived = store.path("unet"), root / "unet" / "history" / f"round_{record.get('round', 0):04d}.pt"
    if record.get("round") not in rounds:
        problems.append(f"published.json names round {record.get('round')}, not a published or the new one")
    elif _sha(served) != rounds[record["round"]]:
        problems.append(f"model.pt is not round {record['round']} that published.json names")
    if not archived.is_file() or _sha(archived) != _sha(served):
        problems.append(f"history has no copy of the served model ({archived.name})")
    return problems


def test_publish_survives_a_crash_at_every_step(tmp_path: Path):
    """Publishing round 2, killed at each step: a reopened store serves round 1 or round 2, as published.json says."""
    pristine, root = tmp_path / "pristine", tmp_path / "models"
    checkpoints = []
    for number in (1, 2):
        path = tmp_path / f"round{number}.pt"
        torch.save({"weights": torch.randn(256, 1024, generator=torch.Generator().manual_seed(number))}, path)
        checkpoints.append(path)
    ModelStore(pristine).publish("unet", checkpoints[0], {"mode": "full"})
    rounds = {1: _sha(checkpoints[0]), 2: _sha(checkpoints[1])}

    def reset() -> None:
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(pristine, root)

    failures: list[str] = []
    result = sweep(lambda: ModelStore(root).publish("unet", checkpoints[1], {"mode": "continual"}), reset,
                   lambda step, where: failures.extend(
                       f"crash at step {step} ({where}): {p}" for p in _store_problems(root, rounds)))
    print(f"model publish: {result.steps} file-system steps, {len(result.crashes)} crashes, {len(failures)} problems")
    assert result.steps > 3 and len(result.crashes) == result.steps
    assert not failures, "\n".join(failures)


# -------------------------------------------------------------------------------------------------
# A real server: SIGKILLed during uploads, training killed at random moments, then restarted
# -------------------------------------------------------------------------------------------------

BIG = "big_ct"  # a fine-grid CT (4.7 M voxels): a label upload is several MB and takes a moment to save
BIG_SHAPE = (192, 192, 128)
TRAIN_KILL_MODES = ("rank", "task", "stop")
LIVER = class_index("liver") + 1


@dataclass
class Site:
    """The module's server, its folders, what the test sent, and what it counted."""

    live: LiveServer
    root: Path
    cohort: Path
    ledger: Ledger
    rng: np.random.Generator
    base_label: np.ndarray
    affine: np.ndarray
    counts: Counter = field(default_factory=lambda: Counter(dict.fromkeys(
        ("uploads attempted", "uploads acknowledged before the kill", "server kills", "training kills", "data lost"),
        0)))
    payloads: int = 0

    @property
    def studies(self) -> Path:
        return self.live.studies

    @property
    def models(self) -> Path:
        return self.root / "models" / "unet"

    def payload(self) -> Path:
        """A new final label for the big CT: its original with a few background voxels made liver."""
        label = self.base_label.copy()
        background = np.flatnonzero(label == 0)
        label.flat[self.rng.choice(background, size=20, replace=False)] = LIVER
        self.payloads += 1
        return _save_label(self.root / f"payload_{self.payloads:03d}.nii.gz", label, self.affine)

    def submit(self, image: str, payload: Path, tag: str = FINAL) -> dict:
        """Upload a label and record it as sent and acknowledged."""
        digest = self.ledger.send(image, tag, payload)
        response = self.live.client.save_label(image, str(payload), tag=tag)
        self.ledger.ack(image, tag, digest)
        return response


@pytest.fixture(scope="module")
def site(tiny_cohort: Path, round1_checkpoint: Path, tmp_path_factory) -> Iterator[Site]:
    """Two phantom CTs and a big CT whose ``original`` label is random classes, served by a live server."""
    root = tmp_path_factory.mktemp("faults")
    live = prepare_site(root, sorted((tiny_cohort / "images").glob("*.nii.gz"))[:2], round1_checkpoint, CONF)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = np.full(BIG_SHAPE, -1000, np.int16)
    image[48:144, 48:144, 32:96] = 40
    nib.save(nib.Nifti1Image(image, affine), str(live.studies / f"{BIG}.nii.gz"))
    rng = np.random.default_rng(SEED)
    base = rng.integers(0, NUM_CLASSES + 1, BIG_SHAPE, dtype=np.uint8)
    with live:
        site = Site(live, root, tiny_cohort, Ledger(), rng, base, affine)
        site.submit(BIG, _save_label(root / "original.nii.gz", base, affine), tag="original")
        yield site
        print(f"\nfault counts: {dict(sorted(site.counts.items()))}")


def _history_files(studies: Path) -> dict[str, str]:
    """sha256 of every file under label_history/ (labels and sidecars), temp files excluded."""
    return {str(p.relative_to(studies)): _sha(p) for p in sorted((studies / "label_history").rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def _label_files(studies: Path) -> dict[str, str]:
    """sha256 of every current label and every history file."""
    return {str(p.relative_to(studies)): _sha(p) for p in sorted((studies / "labels").rglob("*.nii.gz"))
            if not p.name.startswith(".")} | _history_files(studies)


def _rest_problems(site: Site) -> list[str]:
    """What the restarted server itself reports: label info of every labelled image, and no stray labels."""
    problems = []
    objects = site.live.client.datastore()["objects"]
    if stray := sorted(set(objects) - {p.name.removesuffix(".nii.gz") for p in site.studies.glob("*.nii.gz")}):
        problems.append(f"server lists ids that are not images: {stray}")
    for image, tag in site.ledger.sent:
        with urlopen(f"{site.live.url}/datastore/label/info?label={image}&tag={tag}", timeout=60) as response:
            info = json.loads(response.read())
        current = site.studies / "labels" / tag / f"{image}.nii.gz"
        if not info.get("history") or _sha(Path(info["history"])) != _sha(current):
            problems.append(f"{image}/{tag}: the server's label info (v{info.get('version')}) is not the label file")
    return problems


def test_server_killed_during_label_uploads(site: Site):
    """SIGKILL the server at a random moment of a several-MB upload, restart it: nothing lost or torn."""
    live, counts = site.live, site.counts
    started = time.monotonic()
    site.submit(BIG, site.payload())  # a good final label first; its duration scales the kill moments
    upload_seconds = time.monotonic() - started
    problems: list[str] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        for round_number in range(ROUNDS):
            history = _history_files(site.studies)
            payload = site.payload()
            digest = site.ledger.send(BIG, FINAL, payload)
            upload = pool.submit(live.client.save_label, BIG, str(payload), FINAL)
            time.sleep(site.rng.uniform(0.0, 1.25 * upload_seconds))
            live.stop(kill=True)
            counts["uploads attempted"] += 1
            counts["server kills"] += 1
            if upload.exception(timeout=60) is None:
                site.ledger.ack(BIG, FINAL, digest)
                counts["uploads acknowledged before the kill"] += 1
            counts["temp files left by kills"] += len(list(site.studies.rglob(f".*{PARTIAL_SUFFIX}")))
            live.start()
            current = _sha(site.studies / "labels" / FINAL / f"{BIG}.nii.gz")
            counts["kills after which the new label was current" if current == digest else
                   "kills after which the old label was current"] += 1
            found = label_problems(site.studies, site.ledger) + _rest_problems(site)
            found += [f"history file {name} changed or vanished" for name, sha in history.items()
                      if _history_files(site.studies).get(name) != sha]
            problems += [f"round {round_number}: {p}" for p in found]
    counts["data lost"] += len(problems)
    megabytes = (site.root / f"payload_{site.payloads:03d}.nii.gz").stat().st_size / 1e6
    print(f"\nupload kills: {ROUNDS} in {time.monotonic() - started:.0f} s ({megabytes:.1f} MB labels, a save takes "
          f"{upload_seconds:.2f} s), {dict(counts)}")
    assert not problems, "\n".join(problems)
    site.submit(BIG, site.payload())  # the server still takes labels
    assert not label_problems(site.studies, site.ledger)


def _model_state(models: Path) -> dict[str, str]:
    """Everything a training round may change in the model store, as content hashes."""
    return {str(p.relative_to(models)): _sha(p) for p in sorted(models.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def _train_processes(live: LiveServer) -> dict[str, list[psutil.Process]]:
    """The server's train task process, torchrun, and torchrun's workers (train.py ranks)."""
    found: dict[str, list[psutil.Process]] = {"task": [], "torchrun": [], "workers": []}
    for process in live.descendants():
        try:
            cmdline = process.cmdline()
        except psutil.Error:
            continue
        if "monailabel.interfaces.utils.app" in cmdline:
            found["task"].append(process)
        elif "torch.distributed.run" in cmdline:
            found["torchrun"].append(process)
        elif any(arg.endswith("train.py") for arg in cmdline):
            found["workers"].append(process)
    return found


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; TimeoutError saying ``what`` went wrong otherwise."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout:.0f} s")
        time.sleep(0.2)


def _kill_training(site: Site, mode: str) -> str:
    """Kill the running round: one rank (``rank``), the whole task tree (``task``) or via ``DELETE /train/``
    (``stop``), at a random moment; returns where the round was when it died."""
    live = site.live
    if mode == "rank":
        _wait_for(lambda: len(_train_processes(live)["workers"]) == TRAIN_PROCESSES, 180, "no training ranks")
        time.sleep(site.rng.uniform(0.0, 4.0))
    else:
        time.sleep(site.rng.uniform(0.0, 20.0))
    processes = _train_processes(live)
    if not processes["task"]:
        return "ended before the kill"
    phase = "ranks training" if processes["workers"] else "torchrun starting" if processes["torchrun"] else \
        "preparing the round"
    if mode == "rank":
        kill_processes([processes["workers"][int(site.rng.integers(len(processes["workers"])))]])
    elif mode == "task":
        kill_processes([*processes["task"], *processes["torchrun"], *processes["workers"]])
    else:
        live.client.train_stop()
    return phase


def test_training_killed_at_random_points(site: Site):
    """Killed rounds never touch the model store; the next, unkilled round publishes round N+1 cleanly."""
    live, counts, image = site.live, site.counts, "case_0000"
    started = time.monotonic()
    original_file, _ = live.client.infer("unet", image, {"save_label": True, "label_tag": "original"})
    site.ledger.ack(image, "original", site.ledger.send(image, "original", site.studies / "labels" / "original" /
                                                          f"{image}.nii.gz"))
    truth = np.asarray(nib.load(str(site.cohort / "labels_gt" / f"{image}.nii.gz")).dataobj).astype(np.int32)
    expert = _expert_revision(np.asarray(nib.load(original_file).dataobj).astype(np.int32), truth)
    reference = nib.load(str(site.studies / f"{image}.nii.gz"))
    site.submit(image, _save_label(site.root / "expert.nii.gz", expert, reference.affine))
    before = _model_state(site.models)
    rounds = max(3, ROUNDS * 3 // 4)
    problems = []
    for round_number in range(rounds):
        mode = TRAIN_KILL_MODES[round_number % len(TRAIN_KILL_MODES)]
        live.client.train_start("unet", {"max_epochs": 500, "revised_classes": ",".join(REVISED)})
        phase = _kill_training(site, mode)
        status = live.wait_for_training(timeout=120)
        _wait_for(lambda: not live.descendants(), 60, "training processes outlived the kill")
        counts["training kills"] += 1
        counts[f"training kills: {mode}, {phase}"] += 1
        if status["status"] == "DONE" or phase == "ended before the kill":
            details = list(status.get("details", []))[-10:]
            problems.append(f"round {round_number} ({mode}): ended {status['status']} before the kill: {details}")
        if (after := _model_state(site.models)) != before:
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            problems.append(f"round {round_number} ({mode}, {phase}): the model store changed: {changed}")
    counts["data lost"] += len(problems)
    print(f"\ntraining kills: {rounds} in {time.monotonic() - started:.0f} s, {dict(counts)}")
    assert not problems, "\n".join(problems)

    published = json.loads((site.models / "published.json").read_text())["round"]
    live.client.train_start("unet", {"max_epochs": 2, "lr": 0.05, "revised_classes": ",".join(REVISED)})
    status = live.wait_for_training(timeout=400)
    assert status["status"] == "DONE", list(status.get("details", []))[-20:]
    record = json.loads((site.models / "published.json").read_text())
    assert record["round"] == published + 1 and record["mode"] == "continual"
    archived = site.models / "history" / f"round_{record['round']:04d}.pt"
    assert _sha(site.models / "model.pt") == _sha(archived) == record["sha256"]
    assert json.loads((site.models / "last_train.json").read_text())["published"] is True
    assert all(_model_state(site.models)[name] == sha for name, sha in before.items() if name.startswith("history"))
    print(f"clean round after the kills: published round {record['round']} "
          f"({time.monotonic() - started:.0f} s in all)")


def test_restart_keeps_every_label_and_its_history(site: Site):
    """After all of the above, a clean stop and start changes no byte of any label or history version."""
    before = _label_files(site.studies)
    assert any(name.startswith("label_history") for name in before)
    site.live.stop()
    assert _label_files(site.studies) == before, "stopping changed a label"
    site.live.start()
    site.counts["server restarts (clean)"] += 1
    assert _label_files(site.studies) == before, "a restart changed a label"
    assert not label_problems(site.studies, site.ledger)
    assert not _rest_problems(site)
    store = RevisionDatastore(str(site.studies))
    for (image, tag), acked in site.ledger.acked.items():
        listed = [_sha(Path(v["path"])) for v in store.label_history(image, tag)]
        assert [d for d in listed if d in acked] == acked, f"{image}/{tag}: history lost or reordered a version"
