"""Training: the config, the loop, a run on disk (checkpoints, resume, lock), distribution, the plan."""
