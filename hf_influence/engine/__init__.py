"""Numerical core: per-example gradients, HVPs, inverse-HVP solvers, projections and scores."""
