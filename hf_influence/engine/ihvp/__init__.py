"""Inverse-Hessian-vector-product solvers: exact, LiSSA, Arnoldi."""
