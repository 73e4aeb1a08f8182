"""Which sampler at equal cost: flow Euler against multistep solvers with the same number of model passes.

The closed-form testbed of ``alp_testbed.py`` (283 real face frames as a Gaussian mixture, tau 0.3, exact
velocity). Every solver runs N steps on the sampler's published shift-5 grid, one velocity evaluation per step, so N
is the cost. Fidelity is PSNR (peak-to-peak 2) against the converged solve (400 Euler steps), the true
ODE solution all of them approximate, and against the 30-step Euler run (what the sampler gives today).
Mean over report seeds 0..15; nothing is tuned.

ComfyUI's multistep samplers run on the same grid through its k-diffusion interface (denoised = x - sigma * v,
the relation of its flow models), as the FlashPortrait Guider would drive them; they are what the pack's own
adams2 / adams3 must beat to stay.

    python benchmarks/alp_solvers.py [--steps 5 8 10 15 20 30]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

sys.path.insert(0, str(REPO / "scripts"))
from alp_testbed import SHIFT, Case, MixtureVelocity, load_face_frames  # noqa: E402
from inprocess_host import use_host_in_process  # noqa: E402
from flashportrait_core.sampling.schedules import published_sigmas  # noqa: E402
from flashportrait_core.sampling.solvers import sample_adams, sample_euler, sample_unipc  # noqa: E402

OURS = {
    "euler": lambda v, x, grid: sample_euler(v, x, grid),
    "adams2": lambda v, x, grid: sample_adams(v, x, grid, 2),
    "adams3": lambda v, x, grid: sample_adams(v, x, grid, 3),
    "unipc2": lambda v, x, grid: sample_unipc(v, x, grid, 2),
}
COMFY_SAMPLERS = ("ipndm", "deis", "res_multistep", "dpmpp_2m", "lms", "uni_pc")


class Denoiser:
    """A velocity as ComfyUI's samplers call a flow model: ``model(x, sigma) -> x - sigma * v(x, sigma)``."""

    def __init__(self, velocity):
        self.velocity = velocity

    def __call__(self, x, sigma, **_):
        s = float(sigma.flatten()[0])
        return x - s * self.velocity(x.double(), s).to(x.dtype)


def comfy_solver(name: str):
    """ComfyUI's sampler function ``name`` as ``solve(velocity, x, grid)``."""
    use_host_in_process()
    import comfy.k_diffusion.sampling as k_sampling
    from comfy.extra_samplers import uni_pc

    function = uni_pc.sample_unipc if name == "uni_pc" else getattr(k_sampling, f"sample_{name}")
    # In float32, as ComfyUI samples (its UniPC mixes its own float32 coefficients into the update).
    return lambda v, x, grid: function(Denoiser(v), x.float(), grid.float().clone(), extra_args={},
                                       disable=True).to(x.dtype)


def gaussian_check() -> None:
    """Max abs distance to a 2000-step Euler solve on one Gaussian (tau 0.3), whose velocity is linear in x: every
    consistent solver converges there, so a solver that does not would point at its adapter."""
    mean, tau = torch.full((1, 3, 8, 8), 0.3, dtype=torch.float64), 0.3

    def velocity(x, sigma):
        alpha = 1 - sigma
        denoised = mean + alpha * tau * tau / (alpha * alpha * tau * tau + sigma * sigma) * (x - alpha * mean)
        return (x - denoised) / sigma

    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = sample_euler(velocity, x, published_sigmas(2000, SHIFT))
    solvers = {"euler": OURS["euler"], **{name: comfy_solver(name) for name in ("deis", "dpmpp_2m", "uni_pc")}}
    print("max abs distance to the 2000-step solve on one Gaussian")
    for steps in (10, 30, 100):
        print(f"{steps:>4} steps: " + ", ".join(
            f"{name} {float((solve(velocity, x, published_sigmas(steps, SHIFT)) - exact).abs().max()):.3f}"
            for name, solve in solvers.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 5, 8, 10, 15, 20, 30])
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--gaussian-check", action="store_true", help="only the single-Gaussian convergence check")
    args = parser.parse_args(argv)
    if args.gaussian_check:
        gaussian_check()
        return 0
    started = time.time()
    velocity = MixtureVelocity(load_face_frames())
    case = Case(velocity, range(args.seeds))
    solvers = {**OURS, **{name: comfy_solver(name) for name in COMFY_SAMPLERS}}
    print(f"PSNR (dB) of N-step solvers, shift {SHIFT:g}, seeds 0..{args.seeds - 1}: vs converged / vs 30-step Euler")
    print(f"{'steps':>5}  " + "  ".join(f"{name:>15}" for name in solvers))
    for steps in args.steps:
        grid = published_sigmas(steps, SHIFT)
        cells = []
        for name, solve in solvers.items():
            vs_full, vs_conv, evals, _ = case.score(lambda x, solve=solve: (solve(velocity, x, grid), steps))
            if round(evals) != steps:
                raise RuntimeError(f"{name} used {evals} evaluations for {steps} steps")
            cells.append(f"{vs_conv:6.2f} / {vs_full:6.2f}")
        print(f"{steps:>5}  " + "  ".join(f"{c:>15}" for c in cells))
    print(f"command: python benchmarks/alp_solvers.py   ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
