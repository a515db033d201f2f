"""The embedded synthetic dataset: rendering, on-disk layout, determinism, caching and atomic writes."""

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from dmtc.data import synthetic
from dmtc.data.synthetic import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_PALETTE,
    SyntheticSpec,
    generate_synthetic,
    render_sample,
)
from dmtc.errors import DMTCError

SMALL = SyntheticSpec(image_size=64, num_train=24, num_val=8)
NUM_CLASSES = len(SYNTHETIC_CLASSES)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_label(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synthetic") / "syn", SMALL, seed=3)


def test_classes_and_palette():
    assert SYNTHETIC_CLASSES[0] == "background"
    assert 8 <= NUM_CLASSES <= 12
    assert len(SYNTHETIC_PALETTE) == NUM_CLASSES
    assert len(set(SYNTHETIC_PALETTE)) == NUM_CLASSES
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in SYNTHETIC_PALETTE)
    assert SMALL.num_classes == NUM_CLASSES


def test_render_sample_shapes_values_and_classes():
    seen: set[int] = set()
    for i in range(40):
        image, label = render_sample(np.random.default_rng(i), SMALL)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert label.shape == (64, 64) and label.dtype == np.uint8
        values = set(np.unique(label).tolist())
        assert values <= set(range(NUM_CLASSES)) | {255}
        seen |= values
    assert seen == set(range(NUM_CLASSES)) | {255}


def test_render_sample_is_a_function_of_the_rng():
    a = render_sample(np.random.default_rng([1, 0, 5]), SMALL)
    b = render_sample(np.random.default_rng([1, 0, 5]), SMALL)
    c = render_sample(np.random.default_rng([1, 0, 6]), SMALL)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_ignore_band_lies_on_boundaries():
    spec = SyntheticSpec(image_size=64, num_train=1, num_val=1, boundary_width=0)
    _, clean = render_sample(np.random.default_rng(7), spec)
    _, banded = render_sample(np.random.default_rng(7), SyntheticSpec(image_size=64, num_train=1, num_val=1))
    assert 255 not in clean
    band = banded == 255
    assert band.any()
    # Only boundary pixels are ignored: elsewhere the labels agree, and every band pixel has a neighbour
    # of another class in the clean label.
    assert np.array_equal(banded[~band], clean[~band])
    kernel = np.ones((3, 3), np.uint8)
    boundary = cv2.dilate(clean, kernel) != cv2.erode(clean, kernel)
    assert boundary[band].all()
    # A thin band: at most half the foreground is ignored.
    assert band.sum() < 0.5 * (clean > 0).sum()


def test_layout_lists_and_manifest(small_root):
    root = small_root
    for split, n in (("train", 24), ("val", 8)):
        names = (root / "lists" / f"{split}.txt").read_text().splitlines()
        assert names == [f"{split}_{i:05d}" for i in range(n)]
        assert sorted(p.stem for p in (root / "images" / split).iterdir()) == names
        assert sorted(p.stem for p in (root / "labels" / split).iterdir()) == names
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["seed"] == 3
    assert manifest["counts"] == {"train": 24, "val": 8}
    assert manifest["classes"] == list(SYNTHETIC_CLASSES)
    assert manifest["spec"]["image_size"] == 64
    assert manifest["version"] == synthetic.FORMAT_VERSION
    assert not list(root.parent.glob(".syn.tmp-*"))


def test_files_match_render_sample_in_rgb(small_root):
    seen: set[int] = set()
    for split, split_id, n in (("train", 0, 24), ("val", 1, 8)):
        for i in range(n):
            bgr = cv2.imread(str(small_root / "images" / split / f"{split}_{i:05d}.png"), cv2.IMREAD_UNCHANGED)
            label = _read_label(small_root / "labels" / split / f"{split}_{i:05d}.png")
            assert bgr.shape == (64, 64, 3) and label.shape == (64, 64) and label.dtype == np.uint8
            seen |= set(np.unique(label).tolist())
            if i < 3:
                image, expected = render_sample(np.random.default_rng([3, split_id, i]), SMALL)
                assert np.array_equal(bgr[..., ::-1], image)  # on disk in cv2's BGR order
                assert np.array_equal(label, expected)
    assert seen == set(range(NUM_CLASSES)) | {255}


def test_deterministic_per_seed_and_worker_count(tmp_path, small_root):
    same = generate_synthetic(tmp_path / "a", SMALL, seed=3, workers=2)
    assert _files(same) == _files(small_root)
    other = _files(generate_synthetic(tmp_path / "b", SMALL, seed=4, workers=1))
    reference = _files(small_root)
    assert other.keys() == reference.keys()
    assert other["images/train/train_00000.png"] != reference["images/train/train_00000.png"]
    assert other["manifest.json"] != reference["manifest.json"]


def test_cache_hit_does_not_rewrite(tmp_path):
    root = generate_synthetic(tmp_path / "syn", SMALL, seed=0)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert generate_synthetic(str(tmp_path / "syn"), SMALL, seed=0) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps


def test_spec_or_seed_change_regenerates(tmp_path):
    root = generate_synthetic(tmp_path / "syn", SMALL, seed=0)
    smaller = SyntheticSpec(image_size=48, num_train=24, num_val=4)
    generate_synthetic(root, smaller, seed=0)
    assert (root / "lists" / "val.txt").read_text().splitlines() == [f"val_{i:05d}" for i in range(4)]
    assert not (root / "images" / "val" / "val_00007.png").exists()
    assert _read_label(root / "labels" / "train" / "train_00000.png").shape == (48, 48)
    assert json.loads((root / "manifest.json").read_text())["spec"]["num_val"] == 4
    generate_synthetic(root, smaller, seed=1)
    assert json.loads((root / "manifest.json").read_text())["seed"] == 1


def test_half_written_folder_is_regenerated(tmp_path):
    root = tmp_path / "syn"
    (root / "images" / "train").mkdir(parents=True)
    (root / "images" / "train" / "train_00000.png").write_bytes(b"truncated")
    (root / "lists").mkdir()
    generate_synthetic(root, SMALL, seed=3)
    assert (root / "manifest.json").exists()
    assert cv2.imread(str(root / "images" / "train" / "train_00000.png")).shape == (64, 64, 3)
    assert len(list((root / "labels" / "val").iterdir())) == 8


def test_corrupt_manifest_is_regenerated(tmp_path):
    root = generate_synthetic(tmp_path / "syn", SMALL, seed=0)
    (root / "manifest.json").write_text("{not json")
    generate_synthetic(root, SMALL, seed=0)
    assert json.loads((root / "manifest.json").read_text())["seed"] == 0


def test_foreign_folder_is_not_deleted(tmp_path):
    root = tmp_path / "mydata"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(DMTCError, match="notes.txt"):
        generate_synthetic(root, SMALL)
    assert (root / "notes.txt").read_text() == "keep me"


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = 0
    real = synthetic._write_one

    def failing(job):
        nonlocal calls
        calls += 1
        if calls > 5:
            raise KeyboardInterrupt
        real(job)

    monkeypatch.setattr(synthetic, "_write_one", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(tmp_path / "syn", SMALL, workers=1)
    assert not (tmp_path / "syn").exists()
    assert not list(tmp_path.glob(".syn.tmp-*"))


def test_stale_temp_folders_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".syn.tmp-{host}-{dead.pid}-0123abcd"
    running = tmp_path / f".syn.tmp-{host}-{os.getpid()}-0123abcd"
    elsewhere = tmp_path / f".syn.tmp-{host}x-{dead.pid}-0123abcd"
    for folder in (stale, running, elsewhere):
        (folder / "images").mkdir(parents=True)
    generate_synthetic(tmp_path / "syn", SMALL, workers=1)
    assert not stale.exists()
    assert running.exists() and elsewhere.exists()


def test_concurrent_generation(tmp_path, small_root):
    root = tmp_path / "syn"
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: generate_synthetic(root, SMALL, seed=3, workers=1), range(3)))
    assert results == [root] * 3
    assert _files(root) == _files(small_root)
    assert not list(tmp_path.glob(".syn.tmp-*"))
    # Everything but the dataset and its lock file is cleaned up.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".syn.lock", "syn"]


@pytest.mark.parametrize(
    "kwargs", [{"objects": (5, 2)}, {"image_size": 8}, {"num_val": 0}, {"aspect_jitter": 1.0}]
)
def test_invalid_spec(kwargs):
    with pytest.raises(DMTCError, match="SyntheticSpec"):
        SyntheticSpec(**kwargs)


def test_invalid_seed(tmp_path):
    with pytest.raises(DMTCError, match="seed"):
        generate_synthetic(tmp_path / "syn", SMALL, seed=-1)


def test_dataset_root_names_the_spec():
    """A changed spec gets its own folder, so it never regenerates (replaces) the data of other runs that
    share the cache; an override equal to a default, or another seed, maps as expected."""
    from hydra import compose, initialize_config_dir

    import dmtc.config  # noqa: F401  (registers the resolvers)

    hue45 = "dataset.generate.spec.hue_jitter=45"
    cases = [[], ["dataset.generate.spec.hue_jitter=30"], [hue45], ["dataset.generate.seed=3"],
             ["dataset.generate.seed=3", hue45]]
    with initialize_config_dir(str(Path(__file__).parents[1] / "configs"), version_base="1.3"):
        names = [Path(compose("train", overrides=o).dataset.root).name for o in cases]
    assert names[0] == names[1] == "seed0" and names[3] == "seed3"
    assert names[2].startswith("seed0-") and names[4].startswith("seed3-") and names[2][6:] == names[4][6:]


def test_pooled_generation_ends_under_the_entry_points_signal_handlers(tmp_path):
    """Sets of 64+ images are rendered by a fork pool, whose end sends SIGTERM to its workers: under the
    handlers every entry point installs (dmtc.interrupts) the workers must still die, or the pool waits
    forever (the default `python train.py` hung so)."""
    code = (
        "from dmtc import interrupts\n"
        "from dmtc.data.synthetic import SyntheticSpec, generate_synthetic\n"
        "with interrupts.handle_interrupts():\n"
        f"    generate_synthetic({str(tmp_path / 'seed0')!r}, SyntheticSpec(image_size=32, num_train=56, num_val=8))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "seed0" / "images" / "train").glob("*.png"))) == 56
