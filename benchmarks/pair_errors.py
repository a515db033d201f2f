"""How alike are the two models of a DMT pair? Error overlap of A and B on the validation set.

For each run folder given (``python train.py method=dmt|dmtc ...``), loads the best checkpoints of model A
and B of a phase (default: the warm-up) through :mod:`dmtc.from_checkpoint` (architecture, inputs and
dataset from the file), predicts the validation images once, and prints, over the labeled (non-255) pixels:
each model's pixel error rate, the rate at which both are wrong, P(B wrong | A wrong) against the
independent-errors baseline P(B wrong), the disagreement rate, and the rate at which both are wrong *with
the same class* (mutual training cannot correct those: each model's pseudo label confirms the other's).

    python benchmarks/pair_errors.py outputs/bench_streams_gain/dmt_shared_sid0 outputs/...independent_sid0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import dmtc.config  # noqa: F401  (resolvers)
from dmtc.from_checkpoint import restore
from dmtc.inference import predict_probs
from dmtc.metrics import predicted_class
from dmtc.tasks.evaluate import build_val_loader

REPO = Path(__file__).resolve().parents[1]


def predictions(cfg, ckpt: Path, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    restored = restore(cfg, ckpt, key)
    loader = build_val_loader(restored.cfg, None, restored.inputs)
    model = restored.model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for batches in loader:  # each: batches of one image size
            for batch in batches:
                probs = predict_probs(model, batch["image"])
                preds.append(predicted_class(probs).flatten())
                labels.append(batch["label"].flatten())
    return torch.cat(preds), torch.cat(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--phase", default="phase0_warmup")
    args = parser.parse_args()
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("evaluate", overrides=["ckpt=unused"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = "/tmp"
    HydraConfig.instance().set_config(cfg)
    print("| run | A err % | B err % | both wrong % | P(B wrong given A wrong) % | P(B wrong) % | disagree % | "
          "both wrong, same class % |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        done = json.loads((Path(run) / args.phase / "done.json").read_text())
        out = {}
        for key in "ab":
            out[key] = predictions(cfg, Path(run) / done["checkpoints"][key], key)
        (pa, lab), (pb, _) = out["a"], out["b"]
        valid = lab != 255
        pa, pb, lab = pa[valid], pb[valid], lab[valid]
        wa, wb = pa != lab, pb != lab
        both = wa & wb
        same = both & (pa == pb)
        pct = lambda x: 100.0 * float(x.float().mean())  # noqa: E731
        print(f"| {Path(run).name} | {pct(wa):.2f} | {pct(wb):.2f} | {pct(both):.2f} | "
              f"{100.0 * float(both.sum()) / max(1, int(wa.sum())):.2f} | {pct(wb):.2f} | {pct(pa != pb):.2f} | "
              f"{pct(same):.2f} |")


if __name__ == "__main__":
    main()
