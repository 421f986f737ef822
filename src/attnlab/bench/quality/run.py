"""The quality suite's loop: train every planned job at each learning rate and seed of the preset,
and aggregate the runs into one row per job (spec/quality.md §5.2: the max over learning rates of the
mean over seeds). Runs shared between tasks (T1 is T2's N=8 and T3's middle window) are trained once
and reported under each. Progress is reported through a :class:`Listener`; drawing it is the
caller's business.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from attnlab.bench.quality import metrics, tasks
from attnlab.bench.quality.catalog import PRESETS, SLICE_NAME, TASKS, DataCache
from attnlab.bench.quality.model import param_count
from attnlab.bench.quality.plan import Job, NothingToTrain, plan
from attnlab.bench.quality.train import Schedule, fit

RUN_FIELDS = ("lr", "seed", "score", "steps", "best_step", "epochs_run", "stop", "seconds", "sparse_share")


class Listener:
    """What the loop tells its caller, all optional (the CLI draws a progress bar from these)."""

    def start(self, total_steps: int) -> None:
        """Before the first run: the planned optimizer steps of the whole suite."""

    def run_started(self, job: Job, lr: float, seed: int) -> None:
        """One (job, learning rate, seed) run begins (or is taken from an identical earlier run)."""

    def advance(self, steps: int = 1) -> None:
        """``steps`` more of the planned steps are done (an early stop jumps to the run's end)."""

    def job_done(self, row: dict) -> None:
        """A job's row, aggregated over its runs."""


def _train_one(job: Job, lr: float, seed: int, sched: Schedule, data: DataCache, on_step, device) -> dict:
    train, test = data(job.point, seed)
    torch.manual_seed(seed)
    model = job.model().to(device)
    res = fit(model, train, test, replace(sched, lr=lr), seed, on_step)
    res["slices"] = metrics.sliced(res.pop("grid"), tasks.scored(test), test.slice_, job.point.ranges())
    res.update(lr=lr, seed=seed, params=param_count(model))
    return res


def _best_lr(runs: list[dict]) -> tuple[float, dict[float, float]]:
    """The learning rate with the best mean score over seeds, and every rate's mean."""
    lrs = sorted({r["lr"] for r in runs})
    by_lr = {lr: sum(r["score"] for r in runs if r["lr"] == lr) / sum(r["lr"] == lr for r in runs) for lr in lrs}
    return max(lrs, key=lambda lr: by_lr[lr]), by_lr


def _slices(job: Job, chosen: list[dict], cap: float | None, data: DataCache) -> list[dict]:
    """The chosen rate's slices, averaged over seeds, each with its reach cap where there is one."""
    slices = [dict(s) for s in chosen[0]["slices"]]
    for s in slices:  # mean over seeds: the test set and so every slice's members are shared
        s["value"] = sum(next(x["value"] for x in r["slices"] if x["lo"] == s["lo"]) for r in chosen) / len(chosen)
    if cap is not None:
        _, test = data(job.point, 0)
        hit = metrics.reachable(job.mask(), test.answer, tasks.scored(test))
        for s, c in zip(slices, metrics.sliced(hit, tasks.scored(test), test.slice_, job.point.ranges())):
            s["cap"] = c["value"]
    return slices


def _aggregate(job: Job, runs: list[dict], seconds: float, data: DataCache) -> dict:
    point = job.point
    best, by_lr = _best_lr(runs)
    chosen = [r for r in runs if r["lr"] == best]
    regression = point.kind == "regression"
    value = by_lr[best] if not regression else sum(r["mse"] for r in chosen) / len(chosen)
    cap = job.reach_cap(data)
    train, test = data(point, 0)
    shares = [r["sparse_share"] for r in chosen if "sparse_share" in r]
    return {
        "task": point.task,
        "task_name": TASKS[point.task],
        "difficulty": point.difficulty,
        "mechanism": job.name,
        "label": job.label,
        "options": {
            k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in job.opts.items()
        },
        "dim": job.dim,
        "heads": job.heads,
        "params": chosen[0]["params"],
        "state_bytes": job.state_bytes(),
        "policy": job.policy.to_dict() if job.policy else None,
        "sparse_share": sum(shares) / len(shares) if shares else None,
        "metric": "mse" if regression else "accuracy",
        "value": value,
        "cap": cap,
        "leak": metrics.leaks(None if regression else value, cap),
        "best_lr": best,
        "score_by_lr": {str(k): v for k, v in by_lr.items()},
        "slice_name": SLICE_NAME[point.kind],
        "slices": _slices(job, chosen, cap, data),
        "settings": {**dict(point.settings), "train": point.train_n, "test": point.test_n, **point.fixed_settings()},
        "train_test_overlap": tasks.overlap(train, test),
        "runs": [{k: r[k] for k in RUN_FIELDS if k in r} for r in runs],
        "seconds": seconds,
    }


def run(
    names: list[str],
    preset: str = "quick",
    task_ids: list[str] | None = None,
    *,
    smoke=False,
    listener: Listener | None = None,
    device: torch.device | str = "cpu",
    policies: list[str] = (),
) -> tuple[list[dict], list[str]]:
    """Train everything the preset plans on ``device``; returns (rows, notes). Data are generated and
    scored on the CPU; each batch moves to the device. Raises :class:`NothingToTrain` when the
    selection plans no run."""
    cfg, listener, data = PRESETS[preset], listener or Listener(), DataCache()
    sched = replace(cfg.schedule, epochs=1) if smoke else cfg.schedule
    jobs, notes = plan(names, preset, list(task_ids or cfg.tasks), data, smoke, policies)
    if not jobs:
        raise NothingToTrain("nothing to train for these tasks: " + ("; ".join(notes) or "no mechanism or policy"))
    steps = lambda j: sched.epochs * max(1, j.point.train_n // sched.batch)  # noqa: E731
    cache, rows = {}, []
    listener.start(sum(steps(j) * len(cfg.lrs) for j in jobs) * len(cfg.seeds))
    for job in jobs:
        t0, runs = time.perf_counter(), []
        for lr in cfg.lrs:
            for seed in cfg.seeds:
                # the label, not the name: it tells policies and option sets apart
                key = (job.point.data_key, job.label, repr(job.opts), job.dim, lr, seed)
                listener.run_started(job, lr, seed)
                done = 0
                if key not in cache:
                    cache[key] = _train_one(job, lr, seed, sched, data, listener.advance, device)
                    done = cache[key]["steps"]
                listener.advance(steps(job) - done)  # an early stop or a shared run: jump to the planned end
                runs.append(cache[key])
        rows.append(_aggregate(job, runs, time.perf_counter() - t0, data))
        listener.job_done(rows[-1])
    return rows, notes
