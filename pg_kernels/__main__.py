"""`python -m pg_kernels`: what runs on this machine, and what to do about what does not."""

from pg_kernels import env_report

print(env_report())
