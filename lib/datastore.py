"""A MONAI Label LocalDatastore that never loses an expert's label.

- Every upload is checked before anything is written (readable 3D volume, same grid as the image,
  values in the class template, not empty, within the size limit); a bad upload changes nothing.
- Every submitted label is kept, versioned, under ``label_history/<image>/<tag>_vNNNN.nii.gz`` with
  a JSON sidecar; the current label (what trains) is replaced atomically (temp file + rename), so a
  crash mid-upload leaves the old label or the new one, never a torn file.
- ``datastore_v2.json`` (label infos, revision records) is replaced atomically too: MONAI Label rewrites it
  in place, and a crash there left a file the datastore, and so the server, could never open again.
- Opening the datastore finishes what a crash interrupted: temp files of unfinished writes are removed,
  a history label archived without its sidecar gets one (the upload is kept, its version never reused),
  and a label replaced just before the crash gets the info of the history version it holds.
"""

from __future__ import annotations

import filecmp
import json
import logging
import os
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException

from lib.atomic import atomic_copy, atomic_write_text, remove_partials
from lib.datalists import PairCheckError, check_pair
from lib.trainers.revisions import revision_record
from lib.volumes import read_volume

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 512.0
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class UploadRejected(ValueError):
    """A label upload that was refused; nothing was written. The message names the problem."""

    status_code = 422


class UploadTooLarge(UploadRejected):
    status_code = 413


def check_identifier(value: str, what: str = "image id") -> str:
    """Ids become file names: refuse path separators, '..', absolute paths and control characters."""
    if not isinstance(value, str) or not _SAFE_ID.match(value) or ".." in value:
        raise UploadRejected(f"invalid {what} {value!r}: use letters, digits, '.', '_' and '-' only")
    return value


class RevisionDatastore(LocalDatastore):
    """LocalDatastore with checked uploads, atomic label replacement and a full label history."""

    def __init__(self, datastore_path: str, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, **kwargs: Any):
        self.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
        super().__init__(datastore_path, **kwargs)
        if not kwargs.get("read_only", False):
            self._recover()
        if hasattr(self, "_handler"):  # auto reload: our config writes are renames, not in-place modifications
            self._handler.on_moved = self._on_move_event

    # -- crash safety ------------------------------------------------------------------------

    def _update_datastore_file(self, lock: bool = True) -> None:
        """Write ``datastore_v2.json`` atomically (MONAI Label truncates and rewrites it in place)."""
        text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
        with FileLock(self._lock_file) if lock else nullcontext():
            atomic_write_text(self._datastore_config_path, text)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

    def _on_move_event(self, event: Any) -> None:
        """Another process replaced the config file: reload it (what MONAI Label does on modification)."""
        if os.fsdecode(event.dest_path) == self._datastore_config_path:
            self._init_from_datastore_file()

    def _recover(self) -> None:
        """Finish what a crash interrupted: remove temp files of unfinished writes, commit archived labels
        whose sidecar was not written yet, and re-point labels replaced just before their info was saved."""
        root = Path(self._datastore_path)
        with FileLock(self._lock_file):  # every writer holds it, so no temp file here is a live write
            removed = [*remove_partials(root, recursive=False), *remove_partials(self._datastore.label_path(None)),
                       *remove_partials(root / "label_history")]
            committed = self._commit_unrecorded_versions()
            repointed = self._repoint_replaced_labels()
            if repointed:
                self._update_datastore_file(lock=False)
        if removed:
            log.warning("removed %d temp file(s) of interrupted writes: %s", len(removed), [p.name for p in removed])
        for path in committed:
            log.warning("kept %s, archived just before a crash (its sidecar is written now)", path)
        for image_id, tag, version in repointed:
            log.warning("%s label of %s is history v%d (a crash came before its info was saved)", tag, image_id,
                        version)

    def _commit_unrecorded_versions(self) -> list[Path]:
        """History labels a crash left without the sidecar that commits them: write it, so the upload is kept
        and its version number is never reused for another label."""
        committed = []
        for label in sorted((Path(self._datastore_path) / "label_history").glob("*/*_v*.nii.gz")):
            sidecar = label.with_name(label.name.removesuffix(".nii.gz") + ".json")
            if not sidecar.exists():
                version = int(sidecar.stem.split("_v")[-1])
                record = {"version": version, "ts": label.stat().st_mtime,
                          "recovered": "archived just before a crash; this sidecar was written when reopening"}
                atomic_write_text(sidecar, json.dumps(record, indent=1))
                committed.append(label)
        return committed

    def _repoint_replaced_labels(self) -> list[tuple[str, str, int]]:
        """Labels whose file is a newer history version than their info records: the crash came between
        replacing the file and saving its info. Give them that version's info; returns what changed."""
        changed = []
        for image_id, obj in self._datastore.objects.items():
            for tag, label in obj.labels.items():
                recorded = label.info.get("version")
                if recorded is None or self._latest_version(image_id, tag) <= recorded:
                    continue
                current = Path(self._datastore.label_path(tag)) / self._filename(image_id, label.ext)
                for version in reversed(self.label_history(image_id, tag)):
                    if version["version"] > recorded and filecmp.cmp(version["path"], current, shallow=False):
                        label.info = self._current_info(version, current.name)
                        changed.append((image_id, tag, version["version"]))
                        break
        return changed

    # -- history -----------------------------------------------------------------------------

    def history_dir(self, image_id: str) -> Path:
        return Path(self._datastore_path) / "label_history" / check_identifier(image_id)

    def label_history(self, image_id: str, tag: str = DefaultLabelTag.FINAL.value) -> list[dict[str, Any]]:
        """Every version ever saved for (image, tag), oldest first, with its file path and info."""
        folder = self.history_dir(image_id)
        versions = []
        for sidecar in sorted(folder.glob(f"{tag}_v*.json")):
            info = json.loads(sidecar.read_text())
            info["path"] = str(sidecar.with_suffix("").with_suffix(".nii.gz"))
            versions.append(info)
        return versions

    def _latest_version(self, image_id: str, tag: str) -> int:
        """The newest archived version number of (image, tag); 0 when none."""
        return max((int(p.stem.split("_v")[-1]) for p in self.history_dir(image_id).glob(f"{tag}_v*.json")),
                   default=0)

    def _archive(self, image_id: str, tag: str, label_file: str, info: dict[str, Any]) -> dict[str, Any]:
        """Copy the label, then its sidecar (the sidecar commits the version); returns the sidecar's record."""
        folder = self.history_dir(image_id)
        folder.mkdir(parents=True, exist_ok=True)
        version = self._latest_version(image_id, tag) + 1
        target = folder / f"{tag}_v{version:04d}.nii.gz"
        atomic_copy(label_file, target)
        record = {**info, "version": version}
        atomic_write_text(folder / f"{tag}_v{version:04d}.json", json.dumps(record, indent=1, default=str))
        return record | {"path": str(target)}

    @staticmethod
    def _current_info(version: dict[str, Any], name: str) -> dict[str, Any]:
        """The datastore info of a current label that holds the history ``version`` (a label_history entry)."""
        info = {k: v for k, v in version.items() if k != "path"}
        return info | {"ts": int(info.get("ts", time.time())), "name": name, "history": version["path"]}

    # -- uploads -----------------------------------------------------------------------------

    def check_label_upload(self, image_id: str, label_file: str, allow_empty: bool = False) -> np.ndarray:
        """Raise UploadRejected (nothing written) unless ``label_file`` is a usable label for the image."""
        check_identifier(image_id)
        if image_id not in self._datastore.objects:
            raise ImageNotFoundException(f"image {image_id!r} is not in the datastore")
        size = os.path.getsize(label_file)
        if size > self.max_upload_bytes:
            raise UploadTooLarge(
                f"label for {image_id} is {size / 1e6:.1f} MB, above the {self.max_upload_bytes / 1e6:.0f} MB limit"
            )
        try:
            voxels = check_pair(Path(self.get_image_uri(image_id)), Path(label_file))
        except PairCheckError as error:
            raise UploadRejected(f"label for {image_id}: {error}") from error
        assert voxels is not None
        if not allow_empty and not voxels.any():
            raise UploadRejected(f"label for {image_id} is empty (no class voxels); nothing was saved")
        return voxels

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Check, archive a new version, then atomically make it the current label for the tag."""
        check_identifier(label_tag, "label tag")
        self.check_label_upload(image_id, label_filename, allow_empty=label_tag != DefaultLabelTag.FINAL.value)
        obj = self._datastore.objects[image_id]
        with FileLock(self._lock_file):
            version = self._archive(image_id, label_tag, label_filename, dict(label_info or {}) | {"ts": time.time()})
            name = self._filename(image_id, ".nii.gz")
            atomic_copy(version["path"], Path(self._datastore.label_path(label_tag)) / name)
            obj.labels[label_tag] = DataModel(info=self._current_info(version, name), ext=".nii.gz")
            self._update_datastore_file(lock=False)
        log.info("saved %s label v%d for %s", label_tag, version["version"], image_id)
        return image_id

    # -- revisions ---------------------------------------------------------------------------

    def record_revision(
        self, image_id: str, min_changed_voxels: int, predict_original: Callable[[str], str] | None = None
    ) -> dict[str, Any]:
        """Diff the final label against the AI's ``original`` one and store the result in the label info.

        When no original exists yet, ``predict_original(image path) -> label file`` makes one (saved under
        the ``original`` tag, so the comparison can be audited later).
        """
        original_tag, final_tag = DefaultLabelTag.ORIGINAL.value, DefaultLabelTag.FINAL.value
        original_uri = self.get_label_uri(image_id, original_tag)
        if not original_uri or not os.path.isfile(original_uri):
            if predict_original is None:
                return {}
            predicted = predict_original(self.get_image_uri(image_id))
            self.save_label(image_id, predicted, original_tag, {"source": "computed on submit"})
            original_uri = self.get_label_uri(image_id, original_tag)
        ai = read_volume(original_uri)[0]
        expert = read_volume(self.get_label_uri(image_id, final_tag))[0]
        record = revision_record(ai, expert, min_changed_voxels)
        record["version"] = self.get_label_info(image_id, final_tag).get("version")
        record["compared_with"] = {"tag": original_tag, **self.get_label_info(image_id, original_tag)}
        self.update_label_info(image_id, final_tag, {"revision": record})
        return record

    def revised_cases(self) -> list[dict[str, Any]]:
        """Images whose final label carries a revision record: (id, image, label, revised classes)."""
        cases = []
        for image_id in self.get_labeled_images(DefaultLabelTag.FINAL.value):
            revision = self.get_label_info(image_id, DefaultLabelTag.FINAL.value).get("revision") or {}
            cases.append({"id": image_id, "image": self.get_image_uri(image_id),
                          "label": self.get_label_uri(image_id, DefaultLabelTag.FINAL.value),
                          "revised_classes": list(revision.get("revised_classes", []))})
        return cases
