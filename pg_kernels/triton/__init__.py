"""Triton kernels and their launchers. The only package of pg_kernels that imports triton."""
