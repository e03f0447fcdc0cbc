"""Orchestration: what a ``qra search`` / ``qra baseline`` run does around the algorithms of
``planner.search`` — set-up (budget, cost, store-backed executor, run lock), the search and baseline runs,
their progress display and the report. The algorithms never import this package."""
