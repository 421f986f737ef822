"""The quality suite's plan: which (task point, mechanism or policy, width) jobs run, and for each one
left out, why (spec/quality.md §5.2). Everything is read from the mechanisms' records and the
catalogue; no model is built to find out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnlab import registry
from attnlab.bench.quality import mechanisms as mechs
from attnlab.bench.quality import metrics, tasks
from attnlab.bench.quality import policies as pol
from attnlab.bench.quality.catalog import PRESETS, DataCache, Point, points
from attnlab.bench.quality.model import RecallModel, is_linear_family, state_bytes, static_mask
from attnlab.policy import Policy


class NothingToTrain(ValueError):
    """The selection plans no run (every mechanism or policy skips every task point)."""


class Untrainable(ValueError):
    """A mechanism the suite cannot train at a point; the message says why."""


def trainable_options(name: str, seq_len: int, reach: int | None = None) -> dict:
    """The options the suite trains ``name`` with at ``seq_len`` (and ``reach``, T3's window), read
    from the mechanism's record; raises :class:`Untrainable` with the reason when it cannot."""
    mech = registry.get(name)
    if mech.workloads.untrainable:
        raise Untrainable(mech.workloads.untrainable)
    if "self_causal" not in mech.patterns:
        raise Untrainable(f"serves {', '.join(sorted(mech.patterns))} only, not a causal token mixer")
    if reach is not None and mech.workloads.reach is None:
        raise Untrainable("has no reach option to sweep")
    opts = mechs.options_at(name, seq_len, reach)
    try:
        mech.resolve(seq_len, seq_len, True, opts)
    except ValueError as e:
        raise Untrainable(f"ValueError: {str(e).splitlines()[0][:120]}") from e
    return opts


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

    def fixed_state(self) -> bool:
        """Whether every mixer keeps a fixed-size state (the capacity ladder's subject)."""
        return all(is_linear_family(name) for name, _ in self.mixers())

    def reach_cap(self, data: DataCache) -> float | None:
        """The best accuracy the job's static mask allows on the point's test set (None: no cap)."""
        mask = self.mask()
        if mask is None or self.point.kind == "regression":
            return None
        _, test = data(self.point, 0)
        return metrics.reach_cap(mask, test.answer, tasks.scored(test))

    def model(self) -> RecallModel:
        mixer, point, size = self.policy or self.name, self.point, {"dim": self.dim, "heads": self.heads}
        if point.kind == "regression":
            dx = dict(point.settings)["dim"]
            return RecallModel(None, mixer, self.opts, **size, in_features=dx + 2, out_features=1)
        return RecallModel(point.vocab, mixer, self.opts, **size)


def _mechanism_jobs(point: Point, name: str, dims: tuple[int, ...], notes: list[str]) -> list[Job]:
    if point.reach is not None and mechs.reach_option(name) is None:
        return []  # T3 sweeps windows; the others run at full reach in T1
    try:
        opts = trainable_options(name, point.seq_len, point.reach)
    except Untrainable as e:
        notes += [f"{name} ({point.task} {point.difficulty}, d={dim}): skipped: {e}" for dim in dims]
        return []
    shown = ", ".join(f"{k}={v}" for k, v in opts.items() if not isinstance(v, torch.Tensor))
    return [Job(point, name, opts, dim, f"{name}({shown})" if shown else name) for dim in dims]


def plan(
    names: list[str],
    preset: str,
    task_ids: list[str],
    data: DataCache,
    smoke: bool = False,
    policies: list[str] = (),
) -> tuple[list[Job], list[str]]:
    """Every (point, mechanism or policy, dim) to train, and notes for what is skipped and why.
    ``data`` supplies test sets for the quick preset's reach-cap rule."""
    cfg = PRESETS[preset]
    jobs, notes = [], []
    for point in points(preset, task_ids, smoke):
        for name in names:
            jobs += _mechanism_jobs(point, name, cfg.dims, notes)
        if point.reach is not None:
            notes += [f"{name}: not in {point.task} (a policy has no single window to sweep)" for name in policies]
            continue
        for name in policies:
            policy = pol.policy_at(name, point.seq_len)
            jobs += [Job(point, name, {}, dim, f"{name}[{pol.describe(policy)}]", policy) for dim in cfg.dims]
    if preset == "quick":
        jobs, notes = _quick_ladder(jobs, notes, data)
    return jobs, list(dict.fromkeys(notes))


def _quick_ladder(jobs: list[Job], notes: list[str], data: DataCache) -> tuple[list[Job], list[str]]:
    """The quick preset's T2: the ladder measures fixed-state capacity, so linear-family mechanisms
    climb every rung; the others run N=8 (shared with T1) and N=32, the rung where a full-context
    mechanism must still reach 0.99; mechanisms already bound by their reach are left to T3."""
    keep, left = [], {}
    for j in jobs:
        if j.point.task == "T2" and j.reach_cap(data) not in (None, 1.0):
            left[j.label] = "reach-bound: see T3"
        elif j.point.task == "T2" and not j.fixed_state() and j.point.difficulty in ("N=4", "N=16"):
            left[j.label] = "quick preset runs N=8 and N=32 only where some layer keeps the full context"
        else:
            keep.append(j)
    return keep, notes + [f"{label}: left out of parts of T2 ({why})" for label, why in left.items()]
