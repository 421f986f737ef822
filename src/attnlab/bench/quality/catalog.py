"""The quality suite's catalogue: its tasks, the task points each preset runs, the presets (learning
rates, seeds, widths, schedule, default mechanisms) and the data of a point (spec/quality.md §5).

A *point* is one task at one difficulty (T2 at N=16, T3 at window 32, ...). Everything here is a
user-facing choice; what runs of it, and why the rest is skipped, is ``plan``'s business.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from attnlab.bench.quality import metrics, tasks
from attnlab.bench.quality.train import Schedule

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

    @property
    def vocab(self) -> int | None:
        s = dict(self.settings)
        return {"mqar": s.get("vocab"), "passkey": 256, "selective_copy": s.get("vocab"), "regression": None}[self.kind]

    def ranges(self) -> list[tuple[int, int]]:
        """The slices the report breaks a score into (distance, depth or pairs ranges)."""
        if self.kind == "passkey":
            return [(0, 20), (20, 40), (40, 60), (60, 80), (80, 101)]
        if self.kind == "regression":
            return metrics.buckets(self.seq_len // 2)[1:]
        return [(0, 8)] + [(lo, hi) for lo, hi in metrics.buckets(self.seq_len) if lo >= 8]

    def fixed_settings(self) -> dict:
        """Generator settings the point does not vary, for the report."""
        return {"alpha": 0.01, "random_fillers": True} if self.kind == "mqar" else {}


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
    # The mechanisms trained when none is asked for (None: every registered one). A user-facing
    # choice of names, like a command line: the softmax bound, a window, the fixed-state family.
    mechanisms: tuple[str, ...] | None = None


PRESETS = {
    # One learning rate, the spec pilot's (§5.3). With the model's init, 1e-2 left linear attention
    # at chance on N = 8, 16 and 32 (seed 0) where 3e-3 reached 0.77-0.66.
    "quick": Preset(("T1", "T2", "T3"), (3e-3,), (0,), (64,), mechanisms=("dense", "sliding_window", "linear")),
    "full": Preset(tuple(TASKS), (1e-3, 3e-3, 1e-2), (0, 1), (64, 128)),
}


class DataCache:
    """Each point's data, generated once per run: the train set per seed, one test set for all seeds
    (so seeds are compared on the same questions). Runs shared between points share the data too."""

    def __init__(self):
        self._sets: dict = {}

    def _make(self, point: Point, key: tuple, n: int, seed: int) -> tasks.TaskData:
        if (point.data_key, key) not in self._sets:
            self._sets[(point.data_key, key)] = tasks.make(point.kind, n, seed, **dict(point.settings))
        return self._sets[(point.data_key, key)]

    def __call__(self, point: Point, seed: int) -> tuple[tasks.TaskData, tasks.TaskData]:
        """(train, test) of ``point`` for ``seed``."""
        train_seed, test_seed = tasks.split_seeds(seed)
        return self._make(point, ("train", seed), point.train_n, train_seed), self._make(
            point, ("test",), point.test_n, test_seed
        )
