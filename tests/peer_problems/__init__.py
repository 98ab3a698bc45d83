"""The fixed-point, root-finding and implicit-differentiation problems of optimistix's
and jaxopt's own test suites, written anew for eqprop_jax's API (issue 17).

Each test names the peer and the original test it follows. References are analytic
answers or dense float64 (complex128) solves, never the peers' finite differences.
"""
