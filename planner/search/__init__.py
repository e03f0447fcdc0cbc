"""The search algorithms: ``space`` (choices per unit, costs), ``allocation`` (the priors' allocations, the
budget repair, the error-table allocation), ``evolution`` (stage 1), ``surrogate`` (performance model),
``trust_region`` (stage 2), ``pareto`` (front and choice) and ``baselines`` (random, TPE, ILP, greedy).
Running them — set-up, store, executors, report — is ``planner.orchestration``'s."""
