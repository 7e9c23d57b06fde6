import json

import nibabel as nib
import numpy as np
import pytest

from lib.classes import (
    BTCV_TO_UNIVERSAL,
    CLASS_NAMES,
    NUM_CLASSES,
    SEED_REVISED_CLASSES,
    UNIVERSAL_CLASSES,
    LabelValueError,
    UnknownClassError,
    check_universal_label_values,
    class_index,
    class_indices,
    covered_classes,
    map_label_values,
    totalseg_to_universal,
)


def test_template_matches_seed_order():
    assert NUM_CLASSES == 32
    assert class_indices(SEED_REVISED_CLASSES) == (3, 6, 7, 8)  # seed's continual-tuning heads
    assert CLASS_NAMES[0] == "spleen" and CLASS_NAMES[-1] == "kidney_cyst"
    assert len({c.color for c in UNIVERSAL_CLASSES}) == NUM_CLASSES, "colours must be distinct for Slicer"
    assert all(c.label_value == c.index + 1 for c in UNIVERSAL_CLASSES)


@pytest.mark.parametrize(
    "spelling,expected",
    [("Gall Bladder", 3), ("gall_bladder", 3), ("Arota", 7), ("inferior_vena_cava", 8), ("IVC", 8), ("liver", 5)],
)
def test_class_names_accept_user_spellings(spelling, expected):
    assert class_index(spelling) == expected


def test_unknown_class_is_named():
    with pytest.raises(UnknownClassError, match="'appendix'.*spleen"):
        class_index("appendix")


def test_btcv_maps_thirteen_organs_in_order():
    assert sorted(BTCV_TO_UNIVERSAL) == list(range(1, 14))
    assert covered_classes(BTCV_TO_UNIVERSAL) == tuple(range(13))


def test_totalseg_mapping_keeps_voxel_counts_on_real_file(example_ct):
    """Every universal organ holds exactly the voxels of the TotalSegmentator structures mapped into it."""
    _, label_path = example_ct
    source_dir = label_path.parent / "source"
    ts_map = {int(k): v for k, v in json.loads((source_dir / "totalseg_class_map_total.json").read_text()).items()}
    lut = totalseg_to_universal(ts_map)
    source = np.asarray(nib.load(str(source_dir / "example_seg_fast_force_split.nii.gz")).dataobj).astype(int)
    mapped = np.asarray(nib.load(str(label_path)).dataobj)
    checked = 0
    for universal_value in range(1, NUM_CLASSES + 1):
        source_ids = [s for s, u in lut.items() if u == universal_value]
        expected = int(np.isin(source, source_ids).sum())
        assert int((mapped == universal_value).sum()) == expected, CLASS_NAMES[universal_value - 1]
        checked += expected > 0
    assert checked >= 15, "the real CT should contain most abdominal organs"
    assert lut[63] == class_index("postcava") + 1 and lut[52] == class_index("aorta") + 1


def test_unknown_source_values_are_an_error():
    with pytest.raises(LabelValueError, match=r"case\.nii\.gz.*\[99\]"):
        map_label_values(np.array([0, 1, 99]), BTCV_TO_UNIVERSAL, source="case.nii.gz")
    with pytest.raises(LabelValueError, match="outside the class template"):
        check_universal_label_values(np.array([0, 33]), source="x")
