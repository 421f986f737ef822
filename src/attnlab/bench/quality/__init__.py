"""The quality suite (``attnlab bench quality``): small models trained on synthetic recall
tasks, one per mechanism, reported with parameter count, state size, reach caps and leak flags.
Protocol: spec/quality.md §5; modules, bottom up: tasks (generators), metrics, model, train,
catalog (tasks, points, presets, data), mechanisms and policies (what runs with which options), plan
(jobs, and what is skipped and why), run (the training loop and aggregation), report (table, JSON,
plot)."""
