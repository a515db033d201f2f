"""``python pseudo_label.py ckpt=PATH [model_key=a|b] [names=unlabeled|labeled|val] [ratio=r]``: label a
split with any checkpoint, as a DMT phase does (:mod:`dmtc.dmt.labeling`), and report what ratio ``r`` keeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dmtc.data.build import build_layout, prepare_dataset
from dmtc.data.split_resolver import resolve_split
from dmtc.dmt.labeling import label_images, labeling_transform, pseudo_label_summary
from dmtc.errors import DMTCError
from dmtc.files import write_json
from dmtc.from_checkpoint import restore
from dmtc.speed import configure_cuda, prepare_models


def pseudo_label(cfg: DictConfig) -> dict[str, Any]:
    """``python pseudo_label.py ckpt=PATH [model_key=a|b] [names=unlabeled|labeled|val] [ratio=r]``.

    Labels the split's unlabeled (or labeled, or val) images with one checkpoint (dmtc or DMT/DMTC file)
    into ``<run dir>/store`` and writes ``<run dir>/summary.json`` (see :func:`pseudo_label_summary`).
    """
    if not cfg.get("ckpt"):
        raise DMTCError("no checkpoint given: run `python pseudo_label.py ckpt=/path/to/checkpoint`")
    ckpt = Path(cfg.ckpt)
    ratio = float(cfg.ratio)
    if not 0.0 < ratio <= 1.0:
        raise DMTCError(f"ratio={cfg.ratio} must be in (0, 1]: the fraction of each class's pixels kept")
    # architecture, input pipeline and (where recorded) dataset, split and sid come from the checkpoint
    restored = restore(cfg, ckpt, cfg.get("model_key"))
    cfg, model = restored.cfg, restored.model
    configure_cuda(cfg)
    model = prepare_models(cfg, {"model": model})["model"]  # channels_last on CUDA, model.compile
    prepare_dataset(cfg)
    layout = build_layout(cfg)
    split = resolve_split(cfg, layout)
    which = str(cfg.names)
    ds = cfg.dataset
    if which == "unlabeled":
        names, subset = split.unlabeled, split.unlabeled_subset
    elif which == "labeled":
        names, subset = split.labeled, ds.train_subset
    elif which == "val":
        names, subset = split.val, ds.val_subset
    else:
        raise DMTCError(f"names={which!r}: choose unlabeled, labeled or val")
    if not names:
        raise DMTCError(f"split={cfg.split} sid={cfg.sid} has no {which} images (split=1 labels everything)")
    layout.check_files(subset, names, labels=False)
    out = Path(cfg.paths.output_dir)
    store, hist, _ = label_images(
        model, layout, subset, names, out / "store",
        meta={"checkpoint": str(ckpt.resolve()), "model_key": cfg.get("model_key")},
        num_classes=int(ds.num_classes), transform=labeling_transform(cfg, restored.inputs),
        batch_size=int(ds.val_batch_size), num_workers=int(ds.num_workers),
        prefetch_factor=ds.get("prefetch_factor"),
    )
    thresholds = hist.thresholds(ratio)
    summary = {
        "task": "pseudo_label",
        "checkpoint": str(ckpt.resolve()),
        "dataset": ds.name, "split": str(cfg.split), "sid": int(cfg.sid), "names": which,
        "store": str(store.directory.resolve()),
        **pseudo_label_summary(store, hist, thresholds, list(ds.class_names), ratio, layout=layout, subset=subset),
    }
    write_json(out / "summary.json", summary)
    quality = summary.get("quality")
    extra = f", kept labels' mIoU {quality['miou']:.2f}" if quality else ""
    print(f"pseudo labels of {len(names)} {which} images → {store.directory} "
          f"(ratio {ratio}: kept {summary['kept_fraction'] * 100:.1f}% of pixels{extra})")
    return summary
