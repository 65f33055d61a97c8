"""Run a whole grid of studies as one stage graph: local workers or SLURM (submitit)."""
