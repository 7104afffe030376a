"""Runtime: how a stage runs, not what it computes (none of it shapes an output's content).

paths.py (each stage's output folder), entry.py (a stage's main: logging,
params, signals, process group, tracker), env.py (seed, device, precision),
distributed.py (torchrun / DDP), tracking.py (MLflow + DVC metrics files),
atomic.py (temporary file, fsync, rename), codedeps.py (which code each
stage depends on: dvc.yaml's deps and the resume fingerprint).
"""
