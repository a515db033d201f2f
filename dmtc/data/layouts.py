"""Where a dataset's files are: one small description that serves every on-disk layout.

A layout maps ``(subset, name)`` to an image path and a label path through two templates relative to the
dataset root, e.g. the embedded synthetic set and user folders use ``images/{subset}/{name}.png`` and
``labels/{subset}/{name}.png``; PASCAL VOC uses ``JPEGImages/{name}.jpg`` and
``SegmentationClassAug/{name}.png``; Cityscapes ``leftImg8bit/{subset}/{name}_leftImg8bit.png`` with
``name = city/stem``. Name lists come from a list file (``list_template``) or, when there is none, from
scanning the image folder. An optional 256-entry lookup table maps raw label values to train ids
(e.g. Cityscapes label ids → 19 train ids, everything else 255).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmtc.errors import DMTCError

IGNORE_INDEX = 255
"""The label value of pixels no loss or metric counts (void, borders, crop padding, dropped pseudo labels)."""


@dataclass(frozen=True)
class DatasetLayout:
    """Paths of a dataset on disk (see the module docstring for the templates' meaning)."""

    root: Path
    image_template: str
    label_template: str
    list_template: str | None = None
    label_map: np.ndarray | None = None
    name: str = "dataset"

    def image_path(self, subset: str, name: str) -> Path:
        """Image file of ``name`` in ``subset`` (train/val/...)."""
        return self.root / self.image_template.format(subset=subset, name=name)

    def label_path(self, subset: str, name: str) -> Path:
        """Label file of ``name`` in ``subset``."""
        return self.root / self.label_template.format(subset=subset, name=name)

    def check_root(self) -> None:
        """Fail with one clear message if the dataset root is missing."""
        if not self.root.is_dir():
            raise DMTCError(
                f"dataset root {self.root} (dataset.root) does not exist: download {self.name} there or "
                f"point to your copy with `python train.py dataset={self.name} dataset.root=/path/to/data`"
            )

    def has_subset(self, subset: str) -> bool:
        """Whether ``subset`` exists on disk: its list file, or its own image folder (a template whose folder
        holds every subset, like VOC's ``JPEGImages/{name}.jpg``, needs the list)."""
        if self.list_template is not None and (self.root / self.list_template.format(subset=subset)).is_file():
            return True
        if "{subset}" not in self.image_template:
            return False
        prefix = self.image_template.format(subset=subset, name="\0").partition("\0")[0]
        return (self.root / prefix).is_dir()

    def names(self, subset: str) -> list[str]:
        """Names of ``subset``: from its list file, else by scanning the image folder (sorted)."""
        self.check_root()
        if self.list_template is not None:
            path = self.root / self.list_template.format(subset=subset)
            if path.is_file():
                return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
        prefix, _, suffix = self.image_template.format(subset=subset, name="\0").partition("\0")
        folder = self.root / prefix
        if not folder.is_dir():
            where = self.root / self.list_template.format(subset=subset) if self.list_template else folder
            raise DMTCError(f"no '{subset}' images for {self.name}: neither {where} nor {folder} exists")
        found = sorted(str(p.relative_to(folder))[: -len(suffix) or None] for p in folder.rglob(f"*{suffix}"))
        if not found:
            raise DMTCError(f"no '{subset}' images matching *{suffix} under {folder}")
        return found

    def check_files(self, subset: str, names: Sequence[str], *, labels: bool = True) -> None:
        """Fail before training if a listed image (or its label) does not exist; names the files."""
        missing = [self.image_path(subset, n) for n in names if not self.image_path(subset, n).is_file()]
        if labels:
            missing += [self.label_path(subset, n) for n in names if not self.label_path(subset, n).is_file()]
        if missing:
            shown = "\n  ".join(str(p) for p in missing[:5])
            more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DMTCError(
                f"{len(missing)} file(s) listed for {self.name}/{subset} do not exist:\n  {shown}{more}\n"
                f"check dataset.root ({self.root}) and the split lists"
            )
