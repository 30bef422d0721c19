"""Compute kernels behind ``qdot`` (private)."""
