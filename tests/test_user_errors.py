"""Mistakes a new user makes with their own data end in one line naming the key or file and the fix, before
any training (each found by trying dataset=folder as a new user would)."""

from __future__ import annotations

from pathlib import Path

from conftest import expect_user_error, run_script
from test_from_checkpoint import FOLDER, _folder_tree

from dmtc.tasks.train import train


def _folder(tmp_path: Path, *extra: str, **tree) -> list[str]:
    return [*FOLDER, f"dataset.root={_folder_tree(tmp_path / 'mine', **tree)}", *extra]


def test_class_names_must_match_num_classes(compose_cfg, capsys, tmp_path):
    cfg = compose_cfg(overrides=[*_folder(tmp_path), "dataset.class_names=[bg,left]"])
    expect_user_error(train, cfg, capsys, "dataset.num_classes=3", "dataset.class_names has 2 names")


def test_unset_num_classes_is_one_line(tmp_path):
    root = _folder_tree(tmp_path / "mine")
    proc = run_script("train.py", ["dataset=folder", f"dataset.root={root}", "method=supervised", "debug=smoke",
                                   f"paths.log_dir={tmp_path / 'out'}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: dataset.num_classes must be set")


def test_split_with_no_labeled_image(compose_cfg, capsys, tmp_path):
    cfg = compose_cfg(overrides=_folder(tmp_path, "split=100"))  # int(12 / 100) = 0 labeled
    expect_user_error(train, cfg, capsys, "split=100", "no labeled image", "smaller split")


def test_truncated_image_is_found_before_training(compose_cfg, capsys, tmp_path):
    args = _folder(tmp_path, "split=2")
    victim = tmp_path / "mine" / "images" / "train" / "img_7.png"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    cfg = compose_cfg(overrides=args)
    expect_user_error(train, cfg, capsys, str(victim), "truncated PNG")
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()  # nothing trained


def test_truncated_unlabeled_image_too(compose_cfg, capsys, tmp_path):
    args = _folder(tmp_path, "method=dmt", unlabeled=6)
    victim = tmp_path / "mine" / "images" / "unlabeled" / "img_3.png"
    victim.write_bytes(victim.read_bytes()[:40])
    expect_user_error(train, compose_cfg(overrides=args), capsys, str(victim), "truncated")


def test_missing_imagenet_weights_name_the_key(compose_cfg, capsys, tmp_path):
    missing = tmp_path / "nowhere" / "resnet18.pth"
    cfg = compose_cfg(overrides=_folder(tmp_path, "split=1", "backbone=resnet18", "backbone.init=imagenet",
                                        f"backbone.weights={missing}"))
    expect_user_error(train, cfg, capsys, str(missing), "backbone.weights", "backbone.init=none")


def test_label_files_missing_says_how_to_train_them_unlabeled(compose_cfg, capsys, tmp_path):
    args = _folder(tmp_path, "split=1")
    (tmp_path / "mine" / "labels" / "train" / "img_2.png").unlink()
    expect_user_error(train, compose_cfg(overrides=args), capsys, "img_2.png", "images/unlabeled/",
                      "dataset.split_lists.unlabeled")


def test_own_split_lists_set_key_by_key(compose_cfg, tmp_path):
    """dataset.split_lists.labeled / .unlabeled can be set one key at a time (no struct error), and an
    unlabeled list alone is refused with the fix."""
    args = _folder(tmp_path)
    lists = tmp_path / "mine" / "my_lists"
    lists.mkdir()
    (lists / "l.txt").write_text("img_0\nimg_1\nimg_2\n")
    (lists / "u.txt").write_text("".join(f"img_{i}\n" for i in range(3, 12)))
    cfg = compose_cfg(overrides=[*args, "method=dmt", "method.ratios=[1.0]", "method.phase.epochs=1",
                                 "dataset.split_lists.labeled=my_lists/l.txt",
                                 "dataset.split_lists.unlabeled=my_lists/u.txt"])
    results = train(cfg)
    assert results["num_labeled"] == 3 and results["num_unlabeled"] == 9


def test_unlabeled_list_alone_is_refused(compose_cfg, capsys, tmp_path):
    cfg = compose_cfg(overrides=[*_folder(tmp_path), "dataset.split_lists.unlabeled=u.txt"])
    expect_user_error(train, cfg, capsys, "dataset.split_lists.unlabeled=u.txt", "dataset.split_lists.labeled")
