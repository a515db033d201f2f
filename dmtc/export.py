"""Write predictions as PNG files for official evaluation servers and scripts (``eval.export_dir``).

* Cityscapes (``dataset.label_map=cityscapes``): train ids 0..18 mapped back to the **label ids** of
  cityscapesscripts' label table (road 7, ..., bicycle 33), one single-channel uint8 PNG per image named
  ``<stem>_pred.png`` (e.g. ``frankfurt_000000_000294_pred.png``), at the original image size. This is the
  format ``csEvalPixelLevelSemanticLabeling`` (cityscapesscripts) and the benchmark server read: they match
  each ``<city>_<seq>_<frame>_gtFine_labelIds.png`` with ``<city>_<seq>_<frame>*.png``.
* Any other dataset (VOC): palette ("P" mode) PNGs ``<name>.png`` holding class ids, coloured with the VOC
  colour map (class index bit-interleaved, as the VOC devkit's ``labelcolormap``).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from dmtc.data.layouts import IGNORE_INDEX
from dmtc.data.voc import voc_palette
from dmtc.errors import DMTCError

#: colour of 255 (void / border) in VOC label PNGs
VOID_COLOUR = (224, 224, 192)


def cityscapes_train_to_label_ids() -> np.ndarray:
    """256-entry uint8 table ``lut[train id] = label id`` from cityscapesscripts (255 and unused → 0,
    the ``unlabeled`` id, which the official evaluation ignores)."""
    from cityscapesscripts.helpers.labels import labels

    lut = np.zeros(256, dtype=np.uint8)
    for label in labels:
        if 0 <= label.trainId < IGNORE_INDEX and label.id >= 0:
            lut[label.trainId] = label.id
    return lut


def palette_bytes() -> list[int]:
    """Flat 768-entry palette: VOC colours for ids 0..255, ``VOID_COLOUR`` at 255."""
    colours = voc_palette(256)
    colours[IGNORE_INDEX] = VOID_COLOUR
    return [c for rgb in colours for c in rgb]


class PredictionWriter:
    """Writes one PNG per predicted image into ``directory`` (created if needed).

    ``cityscapes=True`` writes label-id PNGs ``<stem>_pred.png`` (flat, stem = last part of the name);
    otherwise palette PNGs ``<name>.png`` (a name's sub-folders are kept).
    """

    def __init__(self, directory: str | Path, *, cityscapes: bool, num_classes: int) -> None:
        self.directory = Path(directory)
        self.cityscapes = cityscapes
        self.num_classes = int(num_classes)
        self._lut = cityscapes_train_to_label_ids() if cityscapes else None
        self._palette = None if cityscapes else palette_bytes()
        self.written = 0
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DMTCError(f"cannot create the export folder {self.directory} ({err.strerror}): set "
                            "eval.export_dir to a writable folder") from err

    def path_for(self, name: str) -> Path:
        """Output file of image ``name``."""
        if self.cityscapes:
            return self.directory / f"{Path(name).name}_pred.png"
        return self.directory / f"{name}.png"

    def write(self, name: str, prediction: np.ndarray) -> Path:
        """Write the H×W class-id ``prediction`` (train ids) of image ``name``; returns the file."""
        pred = np.asarray(prediction).astype(np.uint8)
        path = self.path_for(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.cityscapes:
            if not cv2.imwrite(str(path), self._lut[pred]):
                raise DMTCError(f"cannot write {path}: check that eval.export_dir is writable")
        else:
            image = Image.frombytes("P", (pred.shape[1], pred.shape[0]), np.ascontiguousarray(pred).tobytes())
            image.putpalette(self._palette)
            image.save(path)
        self.written += 1
        return path
