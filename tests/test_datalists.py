from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lib.datalists import ALL_CLASSES, DatasetListError, read_dataset_list


def _write(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    _write(tmp_path / "img" / "a.nii.gz", np.zeros((8, 8, 8), np.int16))
    _write(tmp_path / "lab" / "a.nii.gz", np.ones((8, 8, 8), np.uint8))
    return tmp_path


def _list(root: Path, *lines: str) -> Path:
    path = root / "list.txt"
    path.write_text("# header\n\n" + "\n".join(lines) + "\n")
    return path


def test_good_list_parses_with_partial_classes(root):
    entries = read_dataset_list(_list(root, "img/a.nii.gz\tlab/a.nii.gz\tliver,aorta", "img/a.nii.gz\tlab/a.nii.gz",
                                      "img/a.nii.gz"), root)
    assert [e.line for e in entries] == [3, 4, 5]
    assert entries[0].classes == (5, 7) and entries[1].classes == ALL_CLASSES
    assert entries[2].label is None and entries[0].case_id == "a"


@pytest.mark.parametrize(
    "setup,line,message",
    [
        (lambda r: None, "img/missing.nii.gz\tlab/a.nii.gz",
         r"list\.txt:3: image file .*missing\.nii\.gz does not exist"),
        (lambda r: (r / "img" / "bad.nii.gz").write_bytes(b"not a nifti"), "img/bad.nii.gz\tlab/a.nii.gz",
         r"list\.txt:3: image file .*bad\.nii\.gz: not a readable"),
        (lambda r: _write(r / "lab" / "small.nii.gz", np.ones((8, 8, 4), np.uint8)), "img/a.nii.gz\tlab/small.nii.gz",
         r"list\.txt:3: label .*small\.nii\.gz has shape \(8, 8, 4\) but image"),
        (lambda r: _write(r / "lab" / "moved.nii.gz", np.ones((8, 8, 8), np.uint8), np.diag([2.0, 1, 1, 1])),
         "img/a.nii.gz\tlab/moved.nii.gz", r"list\.txt:3: label .*moved\.nii\.gz affine differs"),
        (lambda r: _write(r / "lab" / "values.nii.gz", np.full((8, 8, 8), 40, np.uint8)),
         "img/a.nii.gz\tlab/values.nii.gz", r"list\.txt:3: .*values\.nii\.gz: label values \[40\] are outside"),
        (lambda r: None, "img/a.nii.gz\tlab/a.nii.gz\tappendix", r"list\.txt:3: unknown class 'appendix'"),
        (lambda r: None, "a\tb\tc\td", r"list\.txt:3: expected 'image<TAB>label"),
    ],
    ids=["missing", "unreadable", "shape", "affine", "values", "class", "fields"],
)
def test_each_bad_line_names_file_and_line(root, setup, line, message):
    setup(root)
    with pytest.raises(DatasetListError, match=message):
        read_dataset_list(_list(root, line), root)


def test_empty_list_and_missing_label(root):
    with pytest.raises(DatasetListError, match="has no cases"):
        read_dataset_list(_list(root, "# only a comment"), root)
    with pytest.raises(DatasetListError, match="a label is required"):
        read_dataset_list(_list(root, "img/a.nii.gz"), root, require_labels=True)
