"""The OCT phantom (data_pipelines/oct_phantom.py): deterministic layered B-scans whose lesions sit where
their kind says, deform the layers and carry their grade in their size; its dataset on disk and through
run_data.open_dataset; and the unsupervised layer extractor (mediclip_jax/evaluate/oct_layers.py) against
the phantom's layer ground truth."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from scipy import ndimage

from data_pipelines import datasets, oct_phantom as op, preprocess, run_data
from mediclip_jax.config_defaults import anomaly_config
from mediclip_jax.evaluate import oct_layers


def _mask_ends(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Columns the mask covers, and its top and bottom row in each."""
  m = mask > 0
  cols = np.where(m.any(axis=0))[0]
  rows = np.arange(m.shape[0])[:, None]
  top = np.where(m, rows, m.shape[0]).min(axis=0)[cols]
  bottom = np.where(m, rows, -1).max(axis=0)[cols]
  return cols, top, bottom


def test_deterministic_in_range_and_layered():
  a = op.oct_phantom(96, 3, "deposit", "severe")
  b = op.oct_phantom(96, 3, "deposit", "severe")
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], op.oct_phantom(96, 4, "deposit", "severe")[0])
  image, mask, layers = op.oct_phantom(96, 3)
  assert image.dtype == mask.dtype == np.float32 and layers.dtype == np.int32 and image.shape == (96, 96)
  assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.1
  assert not mask.any()
  assert set(np.unique(layers)) == set(range(op.N_BOUNDARIES + 1))
  assert (np.diff(layers, axis=0) >= 0).all()  # labels only grow downwards: vitreous, the bands, choroid
  means = [image[layers == k].mean() for k in range(op.N_BOUNDARIES + 1)]
  assert means[0] < 0.1 and means[7] == max(means)  # dark vitreous, the RPE brightest
  assert all(np.sign(means[k + 1] - means[k]) == op.EDGE_SIGNS[k] for k in range(op.N_BOUNDARIES))
  for bad, match in (({"size": 32}, "size must be in"), ({"lesion": "cyst", "grade": "mild"}, "lesion must be"),
                     ({"grade": "mild"}, "grade must be"), ({"lesion": "deposit"}, "grade must be"),
                     ({"noise": -1.0}, "noise must be")):
    with pytest.raises(ValueError, match=match):
      op.oct_phantom(**{"size": 64, **bad})


@pytest.mark.parametrize("lesion", op.LESIONS)
def test_lesions_sit_where_their_kind_says(lesion):
  """Fluid pockets inside the nuclear layers under retinal tissue, subretinal fluid on the RPE, deposits on
  Bruch's membrane; positions compared with the same eye without the lesion."""
  for seed in range(4):
    _, _, normal = op.oct_phantom(96, seed)
    for grade in op.GRADES:
      _, mask, layers = op.oct_phantom(96, seed, lesion, grade)
      inside = mask > 0
      assert inside.sum() >= 4, (seed, grade)
      cols, top, bottom = _mask_ends(mask)
      if lesion == "fluid_intraretinal":
        assert normal[inside].max() <= 5  # above the photoreceptor line's original position
        assert set(np.unique(layers[inside])) <= {3, 4, 5}  # in the INL, OPL or ONL
        assert (layers[top - 1, cols] >= 1).all()  # covered by retina, not open to the vitreous
      elif lesion == "fluid_subretinal":
        assert normal[inside].max() <= 6  # above the RPE band's original position...
        assert (normal[bottom + 1, cols] == 7).all()  # ...right on it
      else:
        assert normal[inside].max() <= 7  # above Bruch's membrane...
        assert (normal[bottom + 1, cols] == 8).all()  # ...right on it


def test_severe_lesions_are_larger_and_every_lesion_deforms_the_layers():
  for lesion in op.LESIONS:
    area = {g: np.mean([op.oct_phantom(64, s, lesion, g)[1].sum() for s in range(20)]) for g in op.GRADES}
    assert area["severe"] > 2.5 * area["mild"], (lesion, area)
    for seed in range(3):
      normal, _, normal_layers = op.oct_phantom(64, seed)
      image, mask, layers = op.oct_phantom(64, seed, lesion, "mild")
      outside = ~ndimage.binary_dilation(mask > 0)
      # Same eye and speckle: any change away from the pocket is tissue pushed aside by it.
      assert ((layers != normal_layers) & outside).sum() >= 5, (lesion, seed)
      assert ((np.abs(image - normal) > 0.1) & outside).sum() >= 5, (lesion, seed)


def test_dataset_on_disk():
  t = time.perf_counter()
  op.oct_phantom_arrays(0, 50, 50, size=128, seed=0)
  assert time.perf_counter() - t < 5.0  # ~5 ms per 128 px image
  arr = op.oct_phantom_arrays(3, 2, 6, size=64, seed=1)
  assert arr["train_layers"].shape == (3, 64, 64) and list(arr["test_grades"][2:]) == ["mild", "severe"] * 3


def test_dataset_layout(tmp_path):
  root = op.make_oct_phantom_dataset(tmp_path / "oct", n_train=3, n_test_normal=2, n_test_abnormal=6, size=64, seed=1)
  d = datasets.load_dataset(root)
  assert d.layout == "mediclip" and (len(d.train), len(d.test)) == (3, 8) and d.has_masks
  datasets.check_masks_complete(d)
  abnormal = [s for s in d.test if s.label == 1]
  assert all(s.mask_path for s in abnormal)
  assert [s.clsname for s in abnormal] == ["mild", "severe"] * 3
  names = [os.path.basename(s.path) for s in abnormal]  # <kind>_<grade>_<index>.png
  assert {n.rsplit("_", 2)[0] for n in names} == set(op.LESIONS)
  assert [n.split("_")[-2] for n in names] == [s.clsname for s in abnormal]
  arr = op.oct_phantom_arrays(3, 2, 6, size=64, seed=1)
  np.testing.assert_array_equal(preprocess.load_mask(d.test[-1].mask_path, 64), arr["test_masks"][-1])
  assert np.abs(preprocess.load_train_image(d.train[0].path, 64) - arr["train_images"][0]).max() <= 0.5 / 255 + 1e-6


def test_open_dataset_generates_the_kind_asked_for(tmp_path):
  c = anomaly_config()
  c.data.phantom, c.data.phantom_kind, c.data.phantom_size = True, "oct", 64
  c.data.phantom_n_test, c.data.phantom_n_train, c.data.k_shot = 2, 3, -1  # -1: all, no particular number
  d = run_data.open_dataset(c.data, str(tmp_path), seed=5)
  assert os.path.samefile(d.root, tmp_path / "phantom_data")
  assert (len(d.train), len(d.test)) == (3, 4) and {s.clsname for s in d.test if s.label} == {"mild", "severe"}
  assert json.loads((tmp_path / "phantom_data" / "phantom.json").read_text())["kind"] == "oct"
  run_data.open_dataset(c.data, str(tmp_path), seed=5)  # the same settings reuse the folder
  c.data.phantom_kind = "chest"
  with pytest.raises(datasets.DatasetError, match="phantom_kind"):
    run_data.open_dataset(c.data, str(tmp_path), seed=5)
  c.data.phantom_kind = "mri"
  with pytest.raises(ValueError, match=r"config\.data\.phantom_kind must be one of \('chest', 'oct'\)"):
    run_data.open_dataset(c.data, str(tmp_path / "other"), seed=5)
  # A chest folder from before the record: still read as chest, refused as OCT; k_shot above n_train counts.
  c.data.phantom_kind, c.data.k_shot = "chest", 4
  legacy = tmp_path / "legacy"
  assert len(run_data.open_dataset(c.data, str(legacy), seed=5).train) == 4
  (legacy / "phantom_data" / "phantom.json").unlink()
  run_data.open_dataset(c.data, str(legacy), seed=5)
  c.data.phantom_kind = "oct"
  with pytest.raises(datasets.DatasetError, match="'kind': 'chest'"):
    run_data.open_dataset(c.data, str(legacy), seed=5)


def test_layer_extractor_recovers_the_phantom_layers():
  """>= 90 % of pixels on noise-free phantoms and >= 85 % with speckle, with and without given edge signs
  (measured: about 99.9 % and 98 % at 128 px)."""
  times = []
  for noise, floor in ((0.0, 0.90), (1.0, 0.85)):
    for seed in range(5):
      image, _, layers = op.oct_phantom(128, seed, noise=noise)
      t = time.perf_counter()
      found = oct_layers.extract_layers(image, op.N_BOUNDARIES, signs=op.EDGE_SIGNS)
      times.append(time.perf_counter() - t)
      assert found.dtype == np.int32 and found.shape == layers.shape
      assert (found == layers).mean() >= floor, (noise, seed, (found == layers).mean())
      if seed < 2:
        assert (oct_layers.extract_layers(image, op.N_BOUNDARIES) == layers).mean() >= floor, (noise, seed)
  assert np.median(times) < 0.25  # ~20 ms on a CPU core
  rows = oct_layers.trace_boundaries(image, op.N_BOUNDARIES, signs=op.EDGE_SIGNS)
  assert (np.diff(rows, axis=0) >= 1).all()  # each boundary below the previous one
  np.testing.assert_array_equal(oct_layers.boundaries_to_labels(rows, 128), found)


def test_layer_extractor_refuses_bad_arguments():
  image = op.oct_phantom(64, 0)[0]
  for kwargs, match in (({"signs": (1, -1)}, "signs must be"), ({"signs": (1, 0, -1, 1, -1, 1, 1, -1)}, "signs must"),
                        ({"max_step": 0}, "max_step"), ({"smoothing": -1.0}, "smoothing")):
    with pytest.raises(ValueError, match=match):
      oct_layers.extract_layers(image, op.N_BOUNDARIES, **kwargs)
  with pytest.raises(ValueError, match="do not fit"):
    oct_layers.extract_layers(image, 64)
  with pytest.raises(ValueError, match=r"shape \(H, W\)"):
    oct_layers.extract_layers(image[None], 3)
