"""Layer policies: which mechanism, with which options, runs in each layer of a model.

A policy is a plain list of ``(mechanism, options)``, one per attention layer, that serializes to
JSON and applies to Hugging Face models (``attnlab.hf.apply_policy``). Static kinds:

* ``Policy.explicit([...])`` — the list as given.
* ``Policy.ratio(n_layers, sparse, linear, every=4, rule=...)`` — SALA-style hybrids (MiniCPM-SALA,
  arXiv 2602.11761): one ``sparse`` layer per ``every`` layers, the others ``linear``.
  ``rule="sala"`` places the sparse layers where MiniCPM-SALA's 32-layer model has them
  ({0, 9, 16, 17, 22, 29, 30, 31}, found by its conversion-time layer selection), rescaled to
  ``n_layers``; ``rule="even"`` spaces them evenly, ending on the last layer (the deepest layers keep
  full retrieval, as SALA's placement does).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from attnlab import registry
from attnlab.core import positive_int

SALA_SPARSE_LAYERS = (0, 9, 16, 17, 22, 29, 30, 31)  # of 32 (spec §7.1)


def _plain(value, where: str):
    """Options as JSON values: tuples become lists; tensors and other objects are refused."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, where) for k, v in value.items()}
    raise ValueError(f"{where}: option values must be JSON-serializable (numbers, strings, lists), got {type(value)}")


@dataclass(frozen=True)
class Layer:
    mechanism: str
    options: dict = field(default_factory=dict)
    reuse: int | None = None  # HyLRA: attend over this earlier layer's selection (a selecting mechanism)
    # Flux: a learned per-sequence choice between this layer's mechanism (the full attention) and
    # {"mechanism": sparse name, "options": {...}}; served by attnlab.nn.TransformerLM
    route: dict | None = None

    def __post_init__(self):
        if self.route is not None:
            if not isinstance(self.route, dict) or "mechanism" not in self.route:
                raise ValueError(f"route must be {{'mechanism': name, 'options': {{...}}}}, got {self.route!r}")
            sparse = Layer(self.route["mechanism"], self.route.get("options", {}))
            object.__setattr__(self, "route", {"mechanism": sparse.mechanism, "options": sparse.options})
        mech = registry.get(self.mechanism)
        if self.reuse is not None and not mech.selects:
            selecting = ", ".join(m.name for m in registry.MECHANISMS if m.selects)
            raise ValueError(
                f"reuse needs a mechanism that selects its keys ({selecting}): it reuses a selection; "
                f"got {self.mechanism}"
            )
        mech.check_option_names(self.options)  # unknown names list the valid
        object.__setattr__(self, "options", _plain(dict(self.options), self.mechanism))


@dataclass(frozen=True)
class Policy:
    layers: tuple[Layer, ...]
    kind: str = "explicit"

    def __post_init__(self):
        for j, layer in enumerate(self.layers):
            src = layer.reuse
            if src is None:
                continue
            ok = isinstance(src, int) and 0 <= src < j and self.layers[src].mechanism == layer.mechanism
            if not ok or self.layers[src].reuse is not None:
                raise ValueError(
                    f"layer {j} reuses layer {src!r}: the source must be an earlier {layer.mechanism} layer "
                    "that computes"
                )

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> Layer:
        return self.layers[i]

    @classmethod
    def explicit(cls, layers) -> Policy:
        """From a list of names, ``(name, options)`` pairs or ``Layer`` records."""
        out = []
        for item in layers:
            if isinstance(item, Layer):
                out.append(item)
            elif isinstance(item, str):
                out.append(Layer(item))
            else:
                name, options = item
                out.append(Layer(name, dict(options)))
        if not out:
            raise ValueError("a policy needs at least one layer")
        return cls(tuple(out))

    @classmethod
    def ratio(
        cls,
        n_layers: int,
        sparse: str | tuple[str, dict] = "block_topk",
        linear: str | tuple[str, dict] = "lightning",
        *,
        every: int = 4,
        rule: str = "even",
    ) -> Policy:
        """``n_layers // every`` (at least 1) sparse layers, the rest linear; see the module docstring."""
        n_layers, every = positive_int("n_layers", n_layers), positive_int("every", every)
        picks = sparse_layers(n_layers, max(1, n_layers // every), rule)
        a, b = (Layer(*((x,) if isinstance(x, str) else x)) for x in (sparse, linear))
        return cls(tuple(a if i in picks else b for i in range(n_layers)), kind=f"ratio:{rule}")

    @classmethod
    def router(
        cls, n_layers: int, full: str | tuple[str, dict] = "dense", sparse=("streaming", {"sinks": 128, "window": 1024})
    ) -> Policy:
        """Flux: every layer routes each sequence between ``full`` and ``sparse`` (a router per layer,
        learned; see ``attnlab.nn.router``)."""
        n_layers = positive_int("n_layers", n_layers)
        name, options = (full, {}) if isinstance(full, str) else full
        s_name, s_opts = (sparse, {}) if isinstance(sparse, str) else sparse
        route = {"mechanism": s_name, "options": dict(s_opts)}
        return cls(tuple(Layer(name, dict(options), route=route) for _ in range(n_layers)), kind="router")

    @classmethod
    def reuse(cls, steps: list[int], rollback=(), sparse: str = "block_topk", **options) -> Policy:
        """HyLRA: from ``attnlab.reuse.plan``'s per-layer steps. Rollback layers run dense, computing
        layers ``sparse`` (a selecting mechanism) with ``options``, the others reuse their source's
        selection."""
        layers = []
        for j, step in enumerate(steps):
            if j in set(rollback):
                layers.append(Layer("dense"))
            else:
                layers.append(Layer(sparse, options, reuse=None if step < 0 else step))
        return cls(tuple(layers), kind="reuse")

    def check(self, n_layers: int) -> None:
        if len(self) != n_layers:
            raise ValueError(f"the policy has {len(self)} layers but the model has {n_layers} attention layers")

    def to_dict(self) -> dict:
        layers = [{"mechanism": x.mechanism, "options": x.options} for x in self.layers]
        for entry, layer in zip(layers, self.layers):
            if layer.reuse is not None:
                entry["reuse"] = layer.reuse
            if layer.route is not None:
                entry["route"] = layer.route
        return {"kind": self.kind, "layers": layers}

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict) -> Policy:
        if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
            raise ValueError('a policy is a JSON object {"kind": ..., "layers": [{"mechanism": ..., "options": ...}]}')
        layers = tuple(
            Layer(x["mechanism"], x.get("options", {}), x.get("reuse"), x.get("route")) for x in data["layers"]
        )
        return cls(layers, kind=data.get("kind", "explicit"))

    @classmethod
    def from_json(cls, source: str) -> Policy:
        """From a JSON string or a path to a JSON file."""
        text = source if source.lstrip().startswith("{") else open(source).read()
        return cls.from_dict(json.loads(text))


def sparse_layers(n_layers: int, count: int, rule: str) -> set[int]:
    """Which of ``n_layers`` layers are sparse when ``count`` of them are."""
    if rule == "even":
        step = n_layers / count
        return {n_layers - 1 - math.floor(i * step) for i in range(count)}
    if rule == "sala":  # SALA's positions as fractions of depth, `count` of them picked evenly
        frac = [i / 31 for i in SALA_SPARSE_LAYERS]
        idx = [len(frac) - 1] if count == 1 else [round(j * (len(frac) - 1) / (count - 1)) for j in range(count)]
        picks = {round(frac[min(i, len(frac) - 1)] * (n_layers - 1)) for i in idx}
        for extra in sorted(sparse_layers(n_layers, count, "even"), reverse=True):  # collisions: fill evenly
            if len(picks) >= min(count, n_layers):
                break
            picks.add(extra)
        return picks
    raise ValueError(f"rule must be 'even' or 'sala', got {rule!r}")
