"""Numba kernels for minencdec's hot loops (a later issue). Each kernel will have the same
signature as the reference function in `minencdec/` it replaces and fall back to it for
cases it does not cover. The reference package never imports this one."""
