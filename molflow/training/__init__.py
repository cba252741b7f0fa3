"""Training molecular flow maps: data from run files, the loop, checkpoints."""
