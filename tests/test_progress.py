"""Progress people can read: plain lines (no carriage returns) outside a terminal, a bar naming the stage
inside one, Lightning's banner once per run."""

from __future__ import annotations

import io
import sys

import lightning as L
import torch
from conftest import run_script, tiny_run_overrides

from dmtc.progress import LogProgress, StageTQDMProgressBar, format_duration, progress_bar


def test_a_dmt_run_outside_a_terminal_logs_plain_lines_once_per_step_block(tmp_path):
    overrides = [*tiny_run_overrides(tmp_path), "method=dmtc", "method.ratios=[0.5,1.0]", "method.phase.epochs=1",
                 "callbacks.progress_bar.log_every_n_steps=2", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_script("train.py", overrides, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "\r" not in out  # no carriage-return progress bars in a log
    assert "warm-up (A, B) step 2/" in out and "phase 1/2 r=0.5 (A on B's, B on A's labels) step 2/" in out
    assert "it/s" in out and "validation at step" in out and "train/a/loss=" in out
    assert out.count("best checkpoints re-validated:") == 3  # warm-up and two phases
    assert "1 phase(s) left: about" in out
    assert out.count("GPU available:") == 1 and out.count("Total params") == 1  # once per run, not per phase


class _Terminal(io.StringIO):
    """An in-memory stdout that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.w * batch).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_in_a_terminal_the_bar_names_the_stage(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    bar = progress_bar(refresh_rate=1)
    assert isinstance(bar, StageTQDMProgressBar)
    bar.stage = "phase 3/5 r=0.6"
    trainer = L.Trainer(max_steps=2, callbacks=[bar], logger=False, enable_checkpointing=False,
                        enable_model_summary=False)
    trainer.fit(_Tiny(), torch.utils.data.DataLoader(torch.ones(2, 1), batch_size=1))
    assert "phase 3/5 r=0.6 · epoch 0" in terminal.getvalue()


def test_outside_a_terminal_the_display_is_log_lines_and_durations_read_well():
    assert isinstance(progress_bar(), LogProgress)  # pytest captures stdout: not a terminal
    assert [format_duration(s) for s in (0.4, 42, 185, 3720)] == ["0s", "42s", "3m05s", "1h02m"]
