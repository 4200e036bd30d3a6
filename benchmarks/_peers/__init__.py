"""Thin adapters that run captum, dattri and kronfluence on our model, data and parameter set.

Used by ``benchmarks/peers.py`` and ``tests/test_peers.py`` only; the ``hf_influence`` package never
imports them. Each adapter builds the library's own object from a `Problem` (one model, one padded
dataset, one parameter selection, one additive damping λ) and converts the library's damping and
score scale to ours: ``scores = g_testᵀ (H + λI)^-1 g_train`` with ``H`` the Hessian of the mean
training loss and per-example cross-entropy losses.
"""
