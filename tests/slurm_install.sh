#!/usr/bin/env bash
# SLURM for the test suite (tests/test_slurm.py starts a one-node cluster from it): Debian's slurm-wlm and
# munge, installed where missing (~15 s). Without root or apt-get it says why, and the SLURM tests skip.
set -u
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v srun >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "SLURM is missing and needs root and apt-get to install (apt-get install slurm-wlm munge):" \
       "the SLURM tests will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq slurm-wlm munge; } >/dev/null; then
  echo "apt-get install slurm-wlm munge failed: the SLURM tests will be skipped" >&2
fi
exit 0
