"""Drop-in replacements for the per-token functions of RL trainers (docs/integrations.md).

One module per trainer, each with the trainer's own function names, signatures and output
dtypes, backed by the fused ops, and `patch()` / `unpatch()` to swap them into an installed
trainer:

    pg_kernels.integrations.verl       verl 0.9.1
    pg_kernels.integrations.trl        TRL 1.16.0
    pg_kernels.integrations.openrlhf   OpenRLHF 0.11.2
    pg_kernels.integrations.slime      slime's calculate_log_probs_and_entropy (no patch)

Importing a module here never imports the trainer; `patch()` does.
"""
