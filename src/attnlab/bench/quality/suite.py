"""The quality suite's plan and loop: presets, task points, the learning-rate x seed sweep, and the
aggregation (spec/quality.md §5.2: the max over learning rates of the mean over seeds).

A *point* is one task at one difficulty (T2 at N=16, T3 at window 32, ...). Each (point, mechanism,
options) is trained at every learning rate and seed of the preset; runs shared between tasks (T1 is
T2's N=8 and T3's middle window) are trained once and reported under each.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from attnlab.bench.quality import mechanisms as mechs
from attnlab.bench.quality import metrics, tasks
from attnlab.bench.quality import policies as pol
from attnlab.bench.quality.model import RecallModel, is_linear_family, param_count, state_bytes, static_mask
from attnlab.bench.quality.train import Schedule, fit
from attnlab.policy import Policy

TASKS = {
    "T1": "MQAR",
    "T2": "MQAR capacity ladder",
    "T3": "MQAR reach (window sweep)",
    "T4": "token passkey",
    "T5": "MQAR with distractor pairs",
    "T6": "selective copy",
    "ICL": "in-context linear regression",
}
SLICE_NAME = {"mqar": "distance", "selective_copy": "distance", "passkey": "depth %", "regression": "pairs"}


@dataclass(frozen=True)
class Point:
    task: str
    difficulty: str
    kind: str
    settings: tuple  # sorted (name, value) pairs for tasks.make
    seq_len: int
    reach: int | None = None  # T3: the window under test
    train_n: int = 20000
    test_n: int = 1000

    @property
    def data_key(self) -> tuple:
        return (self.kind, self.settings, self.train_n, self.test_n)


def _mqar(task, diff, L, N, V=2048, D=0, reach=None, **kw) -> Point:
    s = (("distractors", D), ("pairs", N), ("seq_len", L), ("vocab", V))
    return Point(task, diff, "mqar", s, L, reach, **kw)


def points(preset: str, task_ids: list[str], smoke: bool = False) -> list[Point]:
    """Task points of a preset (smoke: tiny sizes for tests)."""
    full = preset == "full"
    out = []
    if "T1" in task_ids:
        out.append(_mqar("T1", "L=128 N=8 V=2048", 128, 8))
        if full:
            out.append(_mqar("T1", "L=128 N=8 V=8192", 128, 8, V=8192))
            out.append(_mqar("T1", "L=256 N=16 V=2048", 256, 16))
    if "T2" in task_ids:
        out += [_mqar("T2", f"N={n}", 128, n) for n in (4, 8, 16, 32)]
        if full:
            out += [_mqar("T2", f"L=512 N={n}", 512, n) for n in (32, 64)]
    if "T3" in task_ids:
        out += [_mqar("T3", f"w={w}", 128, 8, reach=w) for w in (16, 32, 64)]
        if full:
            out += [_mqar("T3", f"L=256 N=16 w={w}", 256, 16, reach=w) for w in (32, 64, 128)]
    if "T4" in task_ids:
        for L in (256, 512) if full else (256,):
            out.append(Point("T4", f"L={L}", "passkey", (("seq_len", L),), L, train_n=10000))
    if "T5" in task_ids:
        out.append(_mqar("T5", "L=256 N=8 +24 distractors", 256, 8, D=24))
    if "T6" in task_ids:
        s = (("copies", 16), ("seq_len", 256), ("vocab", 16))
        out.append(Point("T6", "L=256 copy 16", "selective_copy", s, 256))
    if "ICL" in task_ids:
        for n in (16, 32) if full else (16,):
            out.append(Point("ICL", f"{n} pairs dim 8", "regression", (("dim", 8), ("points", n)), 2 * n))
    if smoke:
        out = [replace(p, train_n=128, test_n=64) for p in out]
    return out


@dataclass
class Preset:
    tasks: tuple[str, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    dims: tuple[int, ...]
    schedule: Schedule = field(default_factory=Schedule)


PRESETS = {
    # One learning rate, the spec pilot's (§5.3). With the model's init, 1e-2 left linear attention
    # at chance on N = 8, 16 and 32 (seed 0) where 3e-3 reached 0.77-0.66.
    "quick": Preset(("T1", "T2", "T3"), (3e-3,), (0,), (64,)),
    "full": Preset(tuple(TASKS), (1e-3, 3e-3, 1e-2), (0, 1), (64, 128)),
}


def vocab_of(point: Point) -> int | None:
    s = dict(point.settings)
    return {"mqar": s.get("vocab"), "passkey": 256, "selective_copy": s.get("vocab"), "regression": None}[point.kind]


class NothingToTrain(ValueError):
    """The selection plans no run (every mechanism or policy skips every task point)."""


@dataclass
class Job:
    point: Point
    name: str  # a mechanism, or a policy of quality.policies
    opts: dict
    dim: int
    label: str
    policy: Policy | None = None

    @property
    def heads(self) -> int:
        return 1 if self.policy else mechs.heads(self.name)

    def mask(self) -> torch.Tensor | None:
        """The static mask a single softmax mixer answers within (None: no reach cap)."""
        return None if self.policy else static_mask(self.name, self.point.seq_len, self.opts)

    def mixers(self) -> list[tuple[str, dict]]:
        """(mechanism, options) of each mixer layer. A Flux layer counts as its full mechanism:
        either branch may run, so the full cache is kept."""
        if self.policy:
            return [(layer.mechanism, layer.options) for layer in self.policy.layers]
        return [(self.name, self.opts)]

    def state_bytes(self) -> int:
        """The mixers' decoding state, summed over layers (Zoology's rule for deeper models)."""
        L, d, h = self.point.seq_len, self.dim, self.heads
        return sum(state_bytes(name, L, d, h, opts) for name, opts in self.mixers())

    def model(self) -> RecallModel:
        mixer, point, size = self.policy or self.name, self.point, {"dim": self.dim, "heads": self.heads}
        if point.kind == "regression":
            dx = dict(point.settings)["dim"]
            return RecallModel(None, mixer, self.opts, **size, in_features=dx + 2, out_features=1)
        return RecallModel(vocab_of(point), mixer, self.opts, **size)


def plan(
    names: list[str], preset: str, task_ids: list[str], smoke: bool = False, policies: list[str] = ()
) -> tuple[list[Job], list[str]]:
    """Every (point, mechanism or policy, dim) to train, and notes for what is skipped and why."""
    cfg = PRESETS[preset]
    jobs, notes = [], []
    for point in points(preset, task_ids, smoke):
        for name in names:
            for dim in cfg.dims:
                if point.reach is not None and mechs.reach_option(name) is None:
                    continue  # T3 sweeps windows; the others run at full reach in T1
                opts, why = mechs.resolve(name, point.seq_len, point.reach)
                if why:
                    notes.append(f"{name} ({point.task} {point.difficulty}, d={dim}): skipped: {why}")
                    continue
                shown = ", ".join(f"{k}={v}" for k, v in opts.items() if not isinstance(v, torch.Tensor))
                jobs.append(Job(point, name, opts, dim, f"{name}({shown})" if shown else name))
        if point.reach is not None:
            notes += [f"{name}: not in {point.task} (a policy has no single window to sweep)" for name in policies]
            continue
        for name in policies:
            policy = pol.policy_at(name, point.seq_len)
            jobs += [Job(point, name, {}, dim, f"{name}[{pol.describe(policy)}]", policy) for dim in cfg.dims]
    if preset == "quick":
        jobs, notes = _quick_ladder(jobs, notes)
    return jobs, list(dict.fromkeys(notes))


def _quick_ladder(jobs: list[Job], notes: list[str]) -> tuple[list[Job], list[str]]:
    """The quick preset's T2: the ladder measures fixed-state capacity, so linear-family mechanisms
    climb every rung; the others run N=8 (shared with T1) and N=32, the rung where a full-context
    mechanism must still reach 0.99; mechanisms already bound by their reach are left to T3."""
    keep, left = [], {}
    for j in jobs:
        if j.point.task == "T2" and _reach_cap(j) not in (None, 1.0):
            left[j.label] = "reach-bound: see T3"
        elif j.point.task == "T2" and not _fixed_state(j) and j.point.difficulty in ("N=4", "N=16"):
            left[j.label] = "quick preset runs N=8 and N=32 only where some layer keeps the full context"
        else:
            keep.append(j)
    return keep, notes + [f"{label}: left out of parts of T2 ({why})" for label, why in left.items()]


_DATA: dict = {}


def data(point: Point, seed: int) -> tuple[tasks.TaskData, tasks.TaskData]:
    train_seed, test_seed = tasks.split_seeds(seed)
    settings = dict(point.settings)
    for key, n, s in ((("train", seed), point.train_n, train_seed), (("test",), point.test_n, test_seed)):
        if (point.data_key, key) not in _DATA:
            _DATA[(point.data_key, key)] = tasks.make(point.kind, n, s, **settings)
    return _DATA[(point.data_key, ("train", seed))], _DATA[(point.data_key, ("test",))]


def _fixed_state(job: Job) -> bool:
    """Whether every mixer keeps a fixed-size state (the capacity ladder's subject)."""
    return all(is_linear_family(name) for name, _ in job.mixers())


def _reach_cap(job: Job) -> float | None:
    mask = job.mask()
    if mask is None or job.point.kind == "regression":
        return None
    _, test = data(job.point, 0)
    return metrics.reach_cap(mask, test.answer, tasks.scored(test))


def _ranges(point: Point) -> list[tuple[int, int]]:
    if point.kind == "passkey":
        return [(0, 20), (20, 40), (40, 60), (60, 80), (80, 101)]
    if point.kind == "regression":
        return metrics.buckets(point.seq_len // 2)[1:]
    return [(0, 8)] + [(lo, hi) for lo, hi in metrics.buckets(point.seq_len) if lo >= 8]


def _train_one(job: Job, lr: float, seed: int, sched: Schedule, on_step, device="cpu") -> dict:
    train, test = data(job.point, seed)
    torch.manual_seed(seed)
    model = job.model().to(device)
    res = fit(model, train, test, replace(sched, lr=lr), seed, on_step)
    res["slices"] = metrics.sliced(res.pop("grid"), tasks.scored(test), test.slice_, _ranges(job.point))
    res.update(lr=lr, seed=seed, params=param_count(model))
    return res


def _aggregate(job: Job, runs: list[dict], seconds: float) -> dict:
    point = job.point
    lrs = sorted({r["lr"] for r in runs})
    by_lr = {lr: sum(r["score"] for r in runs if r["lr"] == lr) / sum(r["lr"] == lr for r in runs) for lr in lrs}
    best = max(lrs, key=lambda lr: by_lr[lr])
    chosen = [r for r in runs if r["lr"] == best]
    regression = point.kind == "regression"
    value = by_lr[best] if not regression else sum(r["mse"] for r in chosen) / len(chosen)
    slices = [dict(s) for s in chosen[0]["slices"]]
    for s in slices:  # mean over seeds: the test set and so every slice's members are shared
        s["value"] = sum(next(x["value"] for x in r["slices"] if x["lo"] == s["lo"]) for r in chosen) / len(chosen)
    train, test = data(point, 0)
    cap, mask = _reach_cap(job), job.mask()
    if cap is not None:
        hit = metrics.reachable(mask, test.answer, tasks.scored(test))
        for s, c in zip(slices, metrics.sliced(hit, tasks.scored(test), test.slice_, _ranges(point))):
            s["cap"] = c["value"]
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
        "sparse_share": _mean([r["sparse_share"] for r in chosen if "sparse_share" in r]),
        "metric": "mse" if regression else "accuracy",
        "value": value,
        "cap": cap,
        "leak": metrics.leaks(None if regression else value, cap),
        "best_lr": best,
        "score_by_lr": {str(k): v for k, v in by_lr.items()},
        "slice_name": SLICE_NAME[point.kind],
        "slices": slices,
        "settings": {**dict(point.settings), "train": point.train_n, "test": point.test_n, **_fixed(point)},
        "train_test_overlap": tasks.overlap(train, test),
        "runs": [{k: r[k] for k in RUN_FIELDS if k in r} for r in runs],
        "seconds": seconds,
    }


RUN_FIELDS = ("lr", "seed", "score", "steps", "best_step", "epochs_run", "stop", "seconds", "sparse_share")


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _fixed(point: Point) -> dict:
    if point.kind == "mqar":
        return {"alpha": 0.01, "random_fillers": True}
    return {}


def run(
    names: list[str],
    preset: str = "quick",
    task_ids: list[str] | None = None,
    *,
    smoke=False,
    progress=None,
    device: torch.device | str = "cpu",
    policies: list[str] = (),
):
    """Train everything the preset plans on ``device``; returns (rows, notes). Data are generated and
    scored on the CPU; each batch moves to the device."""
    cfg = PRESETS[preset]
    sched = replace(cfg.schedule, epochs=1) if smoke else cfg.schedule
    jobs, notes = plan(names, preset, list(task_ids or cfg.tasks), smoke, policies)
    if not jobs:
        raise NothingToTrain("nothing to train for these tasks: " + ("; ".join(notes) or "no mechanism or policy"))
    steps = lambda j: sched.epochs * max(1, j.point.train_n // sched.batch)  # noqa: E731
    cache, rows = {}, []
    total = sum(steps(j) * len(cfg.lrs) for j in jobs) * len(cfg.seeds)
    bar = progress.add_task("quality", total=total) if progress else None
    advance = (lambda: progress.advance(bar)) if progress else None
    for job in jobs:
        t0, runs = time.perf_counter(), []
        for lr in cfg.lrs:
            for seed in cfg.seeds:
                # the label, not the name: it tells policies and option sets apart
                key = (job.point.data_key, job.label, repr(job.opts), job.dim, lr, seed)
                if progress:
                    desc = f"{job.point.task} {job.point.difficulty} · {job.label} · lr {lr:g} seed {seed}"
                    progress.update(bar, description=desc)
                done = 0
                if key not in cache:
                    cache[key] = _train_one(job, lr, seed, sched, advance, device)
                    done = cache[key]["steps"]
                if progress:  # an early stop or a shared run: jump to the run's planned end
                    progress.advance(bar, steps(job) - done)
                runs.append(cache[key])
        rows.append(_aggregate(job, runs, time.perf_counter() - t0))
        if progress:  # one line per finished job, kept above the bar (and in logs)
            r = rows[-1]
            cap = "" if r["cap"] is None else f" (cap {r['cap']:.3f})"
            progress.console.print(
                f"{r['task']} {r['difficulty']} · {r['label']} d={r['dim']}: {r['metric']} {r['value']:.3f}{cap}"
                f" · {r['seconds']:.0f} s",
                markup=False,
                highlight=False,
            )
    return rows, notes
