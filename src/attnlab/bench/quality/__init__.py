"""The quality suite (``attnlab bench --suite quality``): small models trained on synthetic recall
tasks, one per mechanism, reported with parameter count, state size, reach caps and leak flags.
Protocol: spec/quality.md §5; modules: tasks (generators), model, train, metrics, mechanisms (what
runs with which options), suite (presets, plan, sweep), report (table, JSON, plot)."""
