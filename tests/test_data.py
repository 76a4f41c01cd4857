import shutil

import pytest
import torch
from PIL import Image

from conftest import make_tiny_vit
from vitslim.data import (
    BadImageError,
    DataError,
    calibration_split,
    list_images,
    load_image_folder,
    make_loader,
    skipped_files,
)


def _image(path, color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), color).save(path)


def test_flat_wnid_layout_labels(example_images):
    samples = list_images(example_images)
    assert len(samples) == 16
    names = {p.name: label for p, label in samples}
    assert names["n01440764_tench.JPEG"] == 0
    assert names["n07684084_French_loaf.JPEG"] == 930


def test_flat_layout_without_wnids_is_unlabelled(tmp_path):
    _image(tmp_path / "holiday.jpg")
    assert list_images(tmp_path) == [(tmp_path / "holiday.jpg", -1)]


def test_class_subfolders(tmp_path):
    for cls in ("zebra", "cat"):
        _image(tmp_path / cls / "a.png")
    assert [label for _, label in list_images(tmp_path)] == [0, 1]  # cat, zebra: sorted
    wnid = tmp_path / "w"
    _image(wnid / "n01443537" / "x.jpg")
    _image(wnid / "n01440764" / "y.jpg")
    assert sorted(label for _, label in list_images(wnid)) == [0, 1]


def test_transform_follows_model_config(example_images):
    ds = load_image_folder(example_images, make_tiny_vit(num_classes=1000), limit=2)
    x, label = ds[0]
    assert x.shape == (3, 32, 32) and label == 0 and ds.label_note is None
    other_head = load_image_folder(example_images, make_tiny_vit(num_classes=10), limit=2)  # not ImageNet's classes
    assert other_head[0][1] == -1 and "not ImageNet-1k" in other_head.label_note


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images in"):
        list_images(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        list_images(tmp_path / "missing")


def test_corrupt_image_named_or_skipped(tmp_path, example_images):
    for p in sorted(example_images.iterdir())[:3]:
        shutil.copy(p, tmp_path / p.name)
    bad = tmp_path / "n01443537_goldfish.JPEG"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    model = make_tiny_vit()
    with pytest.raises(BadImageError, match="n01443537_goldfish.JPEG.*--skip-bad"):
        list(make_loader(load_image_folder(tmp_path, model), batch_size=2))
    ds = load_image_folder(tmp_path, model, skip_bad=True)
    images = torch.cat([b[0] for b in make_loader(ds, batch_size=2) if b is not None])
    assert len(images) == 3 and skipped_files(ds) == [bad]


def test_calibration_split_is_seeded_and_disjoint(example_images):
    ds = load_image_folder(example_images, make_tiny_vit())
    calib, rest = calibration_split(ds, 5, seed=1)
    assert len(calib) == 5 and len(rest) == 11
    assert not set(calib.indices) & set(rest.indices)
    assert calibration_split(ds, 5, seed=1)[0].indices == calib.indices
    assert calibration_split(ds, 5, seed=2)[0].indices != calib.indices
    with pytest.warns(UserWarning, match="only 16 are available"):
        calib, rest = calibration_split(ds, 40)
    assert len(calib) == 16 and len(rest) == 0


def test_cross_validation_folds_never_evaluate_on_calibration_images():
    from torch.utils.data import TensorDataset

    from vitslim.data import DataError, cross_validation_folds

    dataset = TensorDataset(torch.arange(40))
    folds = cross_validation_folds(dataset, n_calib=8, n_eval=10, seed=3)
    assert len(folds) == 2
    for calib, held_out in folds:
        assert len(calib) == 8 and len(held_out) == 10
        assert not set(calib.indices) & set(held_out.indices)
    # Each fold calibrates in the half the other evaluates in: no image serves both roles.
    (c0, e0), (c1, e1) = folds
    assert not set(c0.indices) & set(c1.indices) and not set(e0.indices) & set(e1.indices)
    with pytest.raises(DataError, match="at least 18 images"):
        cross_validation_folds(TensorDataset(torch.arange(17)), n_calib=8)
