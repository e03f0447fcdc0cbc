"""qra planner: profile a model, search per-layer (bits, rank) under a memory budget, write a plan."""
