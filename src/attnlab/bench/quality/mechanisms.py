"""Which mechanisms the quality suite trains, and with which options at a sequence length L.

Each record's ``workloads`` says it: ``quality(L)`` (windowed patterns get a window of L/4, T3 sweeping
L/8, L/4, L/2: 16/32/64 at L=128, the spec's reach ladder; block-structured ones blocks of L/16), the
option T3 sweeps, the mixer's heads, and why a mechanism cannot be trained as a causal token mixer
(``plan.trainable_options`` reads that). A record without a ``quality`` workload runs with its
defaults, so a new mechanism is picked up without editing this file.
"""

from __future__ import annotations

from attnlab import registry
from attnlab.bench.quality.catalog import PRESETS


def reach_option(name: str) -> str | None:
    return registry.get(name).workloads.reach


def heads(name: str) -> int:
    return registry.get(name).workloads.heads


def options_at(name: str, seq_len: int, reach: int | None = None) -> dict:
    at = registry.get(name).workloads.quality
    opts = {} if at is None else at(seq_len)
    if reach is not None:
        opts[reach_option(name)] = reach
    return opts


def select(requested: list[str] | None, preset: str) -> tuple[list[str], list[str]]:
    """(mechanisms to run, notes): the requested ones, else the preset's (``catalog.PRESETS``: a
    user-facing list of names, or every registered mechanism); unregistered names in a preset are
    skipped with a note."""
    known = registry.mechanisms()
    if requested:
        return list(dict.fromkeys(requested)), []
    chosen = PRESETS[preset].mechanisms
    wanted = known if chosen is None else list(chosen)
    notes = [f"{n}: not registered in this build; skipped" for n in wanted if n not in known]
    return [n for n in wanted if n in known], notes
