"""Process settings of a training run, for the driver and every Ray worker (no heavy imports: the CLI reads
them before it re-executes itself).

``REPRODUCIBLE_ENV`` pins the numeric code paths that otherwise depend on the CPU, so the same config and
``train.seed`` train the same networks on any x86-64 CPU with AVX2, Intel or AMD (same wheels, same glibc).
Measured (the reproducibility study in the project's notes): without them, torch's bundled oneMKL picks an
AVX-512, AVX2 or SSE path per CPU for the layers' matrix products and ``tanh``/``exp``/``log``; their last-bit
differences grow through PPO's sampling until, after 30 iterations, a run behaves like another seed.  numpy's
SIMD dispatch, OpenBLAS's kernel choice and numba's target change the simulator's float64 numbers by ~1e-12,
pinned too.  Cost: ~3 % per training iteration on the dev machine (the learner's update ~19 %), and the sweep
power flow compiled for a generic x86-64 ~10 % slower.  Training runs (``evgrid train``, ``sweep``, ``demo``)
are pinned; benchmarks and evaluations run at the CPU's own speed.  A value the user already set wins.
"""

from __future__ import annotations

from typing import Any

REPRODUCIBLE_ENV = {
    "MKL_CBWR": "COMPATIBLE",  # oneMKL's CPU-independent code path (honoured on Intel and AMD)
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorised kernels at AVX2 on every x86-64-v3 CPU
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",  # numpy's AVX-512 dispatch off
    "OPENBLAS_CORETYPE": "Haswell",  # numpy's BLAS: one kernel set for every AVX2 CPU
    "NUMBA_CPU_NAME": "generic",  # numba compiles for any x86-64, not for this CPU's features
}

# one thread per process (on small machines more threads stall RLlib; a different thread count also changes
# float reductions); PYTHONHASHSEED: RLlib 2.60's MultiAgentEpisode walks *sets* of agent ids, so which agent
# gets which row of a module's batch follows each process's string-hash seed
BASE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0", "PYTHONHASHSEED": "0"}


def worker_env(pinned: bool) -> dict[str, str]:
    """Environment variables of every Ray worker (``runtime_env``): reaches the workers of a cluster too."""
    return {**BASE_ENV, **(REPRODUCIBLE_ENV if pinned else {})}


def missing(environ: dict[str, str] | Any) -> dict[str, str]:
    """What a training driver's ``environ`` lacks of the pinned settings (a random hash seed counts as
    missing); the CLI re-executes itself with them."""
    out = {k: v for k, v in worker_env(True).items() if k not in environ and k != "RAY_DEDUP_LOGS"}
    if environ.get("PYTHONHASHSEED") == "random":
        out["PYTHONHASHSEED"] = "0"
    return out
