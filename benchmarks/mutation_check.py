"""Plant one-line bugs in DMT's core, one at a time, and check that the test suite catches each.

For every mutation below: copy the checkout (tracked and untracked, unignored files) to a temporary folder,
replace one exact snippet of one file (it must occur exactly once), run the default test suite there
(``python -m pytest -x -q``, with the copy first on ``PYTHONPATH`` so that it, not the installed checkout,
is imported, also by the tests' ``train.py`` subprocesses), and record whether it failed. Prints one line
per mutation and ``caught/total``; exits 1 if any mutation survived. A snippet that no longer matches the
code is reported as an error (update the mutation with the code).

    python benchmarks/mutation_check.py              # all mutations (~30 min on 2 cores)
    python benchmarks/mutation_check.py --only self_training ensemble_is_b
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py (this folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str
    old: str
    new: str


MUTATIONS = [
    # the bugs of the regression-tests issue
    Mutation("self_training", "A trains on its own pseudo labels and B on its own", "dmtc/dmt/mutual.py",
             "loss = self._mutual_loss(key, other, images,", "loss = self._mutual_loss(key, key, images,"),
    Mutation("ensemble_is_b", "the ensemble's prediction is model B's alone", "dmtc/module.py",
             "probs[ENSEMBLE] = sum(probs.values()) / len(probs)",
             "probs[ENSEMBLE] = probs[\"b\"]"),
    Mutation("constant_lr", "a constant learning rate instead of the poly schedule", "dmtc/module.py",
             "lambda step: poly_factor(step, total, self.poly_power)", "lambda step: 1.0"),
    Mutation("resume_no_reload", "on resume, the finished phase's weights are not loaded back into the pair",
             "dmtc/dmt/protocol.py", "        if pending is not None:\n            for key in PAIR:",
             "        if False:\n            for key in PAIR:"),
    Mutation("b_gets_a_weights", "after a phase, B is re-validated and carried on with A's best weights",
             "dmtc/dmt/protocol.py", "load_phase_weights(run.models[key], path, key)",
             'load_phase_weights(run.models[key], best.get("a", path), "a")'),
    Mutation("evaluate_ignores_model_key", "evaluate.py ignores model_key (always the first model)",
             "dmtc/tasks/evaluate.py", 'restored = restore(cfg, ckpt, cfg.get("model_key"))',
             "restored = restore(cfg, ckpt, None)"),
    Mutation("dmtc_weight_ignored", "DMTC's phase weight 0.1 ignored (1.0 in phases too)", "dmtc/settings.py",
             'weight = node.get("weight_warmup" if warmup else "weight_phase")',
             'weight = node.get("weight_warmup")'),
    Mutation("one_device", "build_trainer forced to one device", "dmtc/trainer.py",
             "    kwargs.update(overrides)\n", '    kwargs.update(overrides)\n    kwargs["devices"] = 1\n'),
    Mutation("precision_32", "precision forced to 32-true", "dmtc/trainer.py",
             "    kwargs.update(overrides)\n", '    kwargs.update(overrides)\n    kwargs["precision"] = "32-true"\n'),
    Mutation("val_align_corners", "validation upsampling switched to align_corners=True", "dmtc/module.py",
             "probs[key] = upsample_to(model, logits, size).float().softmax(1)",
             "probs[key] = upsample_logits(logits, size, align_corners=True).float().softmax(1)"),
    # ours: one per step of the algorithm
    Mutation("current_wins_weighted", "pixels where the current model wins keep weight p_y^gamma2 (not 0)",
             "dmtc/losses/mutual.py", "torch.where(current_wins, torch.zeros_like(p_y), w_other)",
             "torch.where(current_wins, w_other, w_other)"),
    Mutation("gammas_swapped", "agreement weighted with gamma2", "dmtc/losses/mutual.py",
             "w_agree = p_y.pow(gamma1)", "w_agree = p_y.pow(gamma2)"),
    Mutation("plain_ce_lost", "gamma1 = gamma2 = 0 still zeroes current-model-wins pixels",
             "dmtc/losses/mutual.py", "if gamma1 == 0 and gamma2 == 0:", "if False:"),
    Mutation("curriculum_keeps_all", "the curriculum keeps every pseudo label whatever the ratio",
             "dmtc/dmt/protocol.py", "thresholds[key] = store, hist.thresholds(float(phase.ratio))",
             "thresholds[key] = store, hist.thresholds(1.0)"),
    Mutation("weak_threshold_ignored", "DMTC's weak threshold ignored for pseudo-labeled pixels",
             "dmtc/dmt/contrast.py", "(confidence > settings.weak_threshold)", "(confidence >= 0)"),
    Mutation("streams_shared", "independent streams silently replaced by shared batches", "dmtc/dmt/pair.py",
             'mode = str(cfg.method.get("streams") or "independent")', 'mode = "shared"'),
    Mutation("last_step_not_validated", "the last step is not validated", "dmtc/callbacks.py",
             "            trainer.should_stop = True", "            pass"),
    Mutation("release_four_branches", "a DMT release file evaluated with all four ASPP branches",
             "dmtc/from_checkpoint.py", "RELEASED_DILATIONS = [6, 12]", "RELEASED_DILATIONS = [6, 12, 18, 24]"),
    Mutation("labeling_ignores_align_corners", "labeling upsamples with align_corners=False always",
             "dmtc/dmt/labeling.py", "align_corners=model_align_corners(model))", "align_corners=False)"),
    Mutation("checkpoint_inputs_dropped", "evaluation normalises with the config's init, not the checkpoint's",
             "dmtc/from_checkpoint.py", 'inputs = dict(arch.get("inputs") or {})', "inputs = {}"),
    # crash safety (issue 15)
    Mutation("checkpoint_in_place", "checkpoints (and every atomic write) written in place: a failed save "
             "leaves a truncated file or none", "dmtc/files.py", '        with open(tmp, "xb") as f:',
             '        tmp = path\n        with open(tmp, "wb") as f:'),
    Mutation("resume_trusts_any_file", "a resume takes last.ckpt without checking it can be read",
             "dmtc/checkpoint_io.py", "        problem = checkpoint_problem(path)\n", "        problem = None\n"),
    Mutation("divergence_unchecked", "non-finite losses and gradients are never reported", "dmtc/divergence.py",
             "        if first < 0:\n            return", "        if True:\n            return"),
    Mutation("interrupt_not_saved", "SIGTERM while training saves nothing (the rerun repeats the steps)",
             "dmtc/interrupts.py", "        if step != self._saved_step or not path.is_file():",
             "        if False:"),
    Mutation("resume_keeps_old_lr", "a resumed run keeps the learning rate of the checkpoint", "dmtc/module.py",
             "        if len(optimizers) != 1:\n            return", "        if True:\n            return"),
    Mutation("no_run_lock", "a second command on a busy run folder takes it too", "dmtc/run_lock.py",
             "            if err.errno in (errno.EAGAIN, errno.EACCES):\n                return False",
             "            if err.errno in (errno.EAGAIN, errno.EACCES):\n                return True"),
]


def copy_tree(dest: Path) -> None:
    """The checkout's tracked and untracked-unignored files (no .venv, outputs, caches)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_one(mutation: Mutation, timeout: int) -> tuple[str, float]:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutation.name}-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        target = tree / mutation.path
        text = target.read_text()
        if text.count(mutation.old) != 1:
            return f"ERROR (snippet found {text.count(mutation.old)} times in {mutation.path})", 0.0
        target.write_text(text.replace(mutation.old, mutation.new))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]),
                   WANDB_MODE="disabled")
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"], cwd=tree,
                                  env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "caught (timeout)", time.perf_counter() - start
        wall = time.perf_counter() - start
        if proc.returncode == 0:
            return "SURVIVED", wall
        # a failing test (FAILED) or a test whose fixture failed (ERROR, e.g. a run the tests share crashed)
        failed = [line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
        return f"caught by {failed[0] if failed else '(collection error)'}", wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="mutation names to run (default: all)")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per suite run")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutations {sorted(unknown)}; known: {[m.name for m in MUTATIONS]}")
    print(f"{datetime.date.today()}, {cpu_model()}, `python benchmarks/mutation_check.py`\n")
    print("| mutation | what | result | suite s |")
    print("|---|---|---|---|")
    caught = errors = 0
    for mutation in chosen:
        result, wall = run_one(mutation, args.timeout)
        caught += result.startswith("caught")
        errors += result.startswith("ERROR")
        print(f"| {mutation.name} | {mutation.what} | {result} | {wall:.0f} |", flush=True)
    print(f"\ncaught {caught}/{len(chosen)}" + (f" ({errors} snippets no longer match the code)" if errors else ""))
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
