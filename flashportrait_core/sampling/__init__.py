"""Sampling: noise schedules, sliding windows, guidance, ALP, multistep solvers, the window loop and resume."""
