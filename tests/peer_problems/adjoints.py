"""The adjoints every ported peer problem is differentiated with (each test file adds
its unrolled variant): the implicit ones with each linear solver, and the iterative
ones that need ρ(∂f/∂z) < 1."""

import eqprop_jax as eqp

NEUMANN_K = 10  # Neumann(k): the series truncated after k terms

IMPLICIT = {
    "implicit": eqp.Implicit(),
    "implicit_gmres": eqp.Implicit(eqp.GMRES()),
    "implicit_normal_cg": eqp.Implicit(eqp.NormalCG()),
}
ITERATIVE = {"almeida_pineda": eqp.AlmeidaPineda(), "neumann": eqp.Neumann(NEUMANN_K)}
