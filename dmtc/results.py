"""results.json files and the summary table printed at the end of a run."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def format_table(title: str, per_class_iou: Mapping[str, float | None], miou: float) -> str:
    """A plain-text table of per-class IoU and mIoU (absent classes shown as '-')."""
    width = max([len(n) for n in per_class_iou] + [4])
    lines = [title, "-" * (width + 10)]
    for name, iou in per_class_iou.items():
        lines.append(f"{name:<{width}}  {'-' if iou is None else f'{iou:6.2f}':>6}")
    lines.append("-" * (width + 10))
    lines.append(f"{'mIoU':<{width}}  {miou:6.2f}")
    return "\n".join(lines)
