"""Convert a multi-head attention layer into decoupled-head attention (DHA, Chen et al., "DHA:
Learning Decoupled-Head Attention from Transformer Checkpoints via Adaptive Heads Fusion", arXiv
2406.06567, spec §10.2), or into GQA by mean pooling (Ainslie et al., "GQA: Training Generalized
Multi-Query Transformer Models from Multi-Head Checkpoints", arXiv 2305.13245).

DHA converts in three steps: Search (find groups of similar heads), Fusion (merge each group's key
and value projections into one head), and short continued pre-training. This module does the first
two, training-free; continued pre-training is the caller's.

``method="cluster"`` (DHA's Search and the collapsed state of its Fusion):

* Search, separately for keys and values (DHA decouples them), with similarity pluggable through
  ``calibration``. Without calibration inputs a head is described by its projection
  ``[W_h | b_h]`` (flattened): for white inputs, the squared distance between two heads is the
  expected squared distance of their key (value) vectors. With calibration inputs ``X`` a head is
  described by its outputs ``X W_h^T + b_h`` on them, which weights directions by how the data uses
  them. Heads are grouped by Ward agglomerative clustering (the merge that least increases the
  within-group sum of squared distances, repeated until ``kv_heads`` groups remain). [inferred: the
  spec names "cosine / CKA, agglomerative clustering" as a proposal; we use Euclidean distance and
  Ward linkage because that is exactly the error the fusion below makes, so Search and Fusion
  optimize one objective. Group sizes may be unequal, which DHA's runtime allows.]
* Fusion: DHA learns per-head mixing weights ``omega`` (initialized to the identity) that a
  Lagrangian term pushes to agree within a group, then collapses the group. Without training we take
  the collapsed state with uniform ``omega``: the group's mean projection. The mean is the minimizer
  of the within-group squared error under both similarities above (X mean(W) = mean(X W)), so the
  clustering minimizes exactly the fusion error. [inferred: the learned omega needs training data.]

``method="mean"``: the GQA uptraining conversion: consecutive heads (query head h -> group
h // (H / G)), their key and value projections mean-pooled. Needs H % G == 0.

Query and output projections are kept as they are, so every query head keeps its own slot.

Inputs: ``torch.nn.MultiheadAttention`` (kdim = vdim = embed_dim, no bias_k/bias_v, no zero attn;
its dropout is dropped, which matters only in training), or any MHA-like module with ``heads`` (int)
and ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (``nn.Linear``), with one key and one value head per
query head (``attnlab.nn.DecoupledHeadAttention`` with identity groupings is one).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from attnlab.core import positive_int
from attnlab.nn.dha import DecoupledHeadAttention
from attnlab.reference import causal_mask

METHODS = ("cluster", "mean")


class HeadWeights(NamedTuple):
    """An MHA layer's projections, with the key and value projections split per head."""

    dim: int
    heads: int
    wq: Tensor  # [H*D, dim]
    bq: Tensor | None  # [H*D]
    wk: Tensor  # [H, D, dim]
    bk: Tensor | None  # [H, D]
    wv: Tensor  # [H, Dv, dim]
    bv: Tensor | None  # [H, Dv]
    wo: Tensor  # [dim, H*Dv]
    bo: Tensor | None  # [dim]


def _split(w: Tensor, b: Tensor | None, heads: int):
    return w.unflatten(0, (heads, -1)), None if b is None else b.unflatten(0, (heads, -1))


def mha_weights(module: nn.Module) -> HeadWeights:
    """Read the projections of an ``nn.MultiheadAttention`` or an MHA-like module (see module doc)."""
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            raise ValueError("attn_module: nn.MultiheadAttention with kdim/vdim, bias_k/bias_v or add_zero_attn")
        E, H = module.embed_dim, module.num_heads
        w = module.in_proj_weight.detach()
        b = None if module.in_proj_bias is None else module.in_proj_bias.detach()
        (wq, wk, wv), (bq, bk, bv) = w.split(E), (None,) * 3 if b is None else b.split(E)
        out = module.out_proj
        return HeadWeights(E, H, wq, bq, *_split(wk, bk, H), *_split(wv, bv, H), *_linear(out))
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if not all(isinstance(getattr(module, n, None), nn.Linear) for n in names) or not hasattr(module, "heads"):
        raise ValueError(
            "attn_module must be nn.MultiheadAttention or have `heads` and nn.Linear q_proj, k_proj, v_proj, "
            f"o_proj; got {type(module).__name__}"
        )
    H = positive_int("attn_module.heads", module.heads)
    q, k, v, o = (getattr(module, n) for n in names)
    identity = tuple(range(H))
    for attr in ("key_groups", "value_groups"):
        if tuple(getattr(module, attr, identity)) != identity:
            raise ValueError(f"attn_module must be MHA (one kv head per query head), its {attr} is not the identity")
    dims = {q.in_features, k.in_features, v.in_features, o.out_features}
    if len(dims) != 1 or q.out_features % H or k.out_features != q.out_features or v.out_features % H:
        raise ValueError(
            f"attn_module must be MHA over one width with {H} heads: q_proj {q.in_features}->{q.out_features}, "
            f"k_proj {k.in_features}->{k.out_features}, v_proj {v.in_features}->{v.out_features}"
        )
    if o.in_features != v.out_features:
        raise ValueError(f"attn_module.o_proj must read the {v.out_features} value features, reads {o.in_features}")
    return HeadWeights(q.in_features, H, *_linear(q), *_split(*_linear(k), H), *_split(*_linear(v), H), *_linear(o))


def _linear(layer: nn.Linear) -> tuple[Tensor, Tensor | None]:
    return layer.weight.detach(), None if layer.bias is None else layer.bias.detach()


def head_features(w: Tensor, b: Tensor | None, calibration: Tensor | None = None) -> Tensor:
    """[H, F] descriptions of heads w [H, E, dim], b [H, E]: [W_h | b_h], or outputs on calibration."""
    if calibration is None:
        parts = [w.flatten(1)] + ([] if b is None else [b])
        return torch.cat(parts, dim=1).double()
    x = calibration.reshape(-1, w.shape[-1]).to(w)  # [N, dim]
    out = torch.einsum("nc,hec->hne", x, w)  # [H, N, E]
    if b is not None:
        out = out + b.unsqueeze(1)
    return out.flatten(1).double()


def cluster_heads(features: Tensor, groups: int) -> tuple[int, ...]:
    """Ward agglomerative clustering of heads (rows of features [H, F]) into ``groups`` groups.

    Each step merges the two groups A, B whose merge least raises the within-group sum of squares,
    |A||B| / (|A| + |B|) * ||mean_A - mean_B||^2 (ties: the lowest indices). Groups are numbered by
    their lowest head, so ``groups == H`` returns the identity.
    """
    H = features.shape[0]
    if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= H:
        raise ValueError(f"kv_heads must be an int in [1, {H}] (the number of head groups), got {groups!r}")
    members = [[h] for h in range(H)]
    means = features.double().clone()
    sizes = torch.ones(H, dtype=torch.float64, device=features.device)
    while len(members) > groups:
        sq = means.square().sum(1)
        d2 = (sq[:, None] + sq[None, :] - 2 * means @ means.T).clamp(min=0)  # [n, n] squared distances
        cost = sizes[:, None] * sizes[None, :] / (sizes[:, None] + sizes[None, :]) * d2
        cost.fill_diagonal_(float("inf"))
        a, b = divmod(int(cost.argmin()), len(members))  # row-major first minimum: a < b
        means[a] = (sizes[a] * means[a] + sizes[b] * means[b]) / (sizes[a] + sizes[b])
        sizes[a] += sizes[b]
        members[a] += members[b]
        keep = [i for i in range(len(members)) if i != b]
        means, sizes, members = means[keep], sizes[keep], [members[i] for i in keep]
    labels = [0] * H
    for g, group in enumerate(sorted(members, key=min)):
        for h in group:
            labels[h] = g
    return tuple(labels)


def _fuse(w: Tensor, b: Tensor | None, labels: tuple[int, ...]) -> tuple[Tensor, Tensor | None]:
    """Mean of each group's per-head blocks: w [H, E, dim] -> [G*E, dim], b [H, E] -> [G*E]."""
    idx = torch.tensor(labels, device=w.device)
    G = max(labels) + 1
    counts = torch.bincount(idx, minlength=G).to(w.dtype)

    def mean(x: Tensor) -> Tensor:
        sums = torch.zeros(G, *x.shape[1:], dtype=x.dtype, device=x.device).index_add_(0, idx, x)
        return (sums / counts.view(G, *[1] * (x.dim() - 1))).flatten(0, 1)

    return mean(w), None if b is None else mean(b)


def _counts(kv_heads, H: int) -> tuple[int, int]:
    pair = kv_heads if isinstance(kv_heads, (tuple, list)) else (kv_heads, kv_heads)
    if len(pair) != 2 or any(isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= H for n in pair):
        raise ValueError(
            f"kv_heads must be an int or a (key_heads, value_heads) pair of ints in [1, {H}], got {kv_heads!r}"
        )
    return pair[0], pair[1]


def to_dha(
    attn_module: nn.Module, kv_heads, *, method: str = "cluster", calibration: Tensor | None = None
) -> DecoupledHeadAttention:
    """An MHA layer as a :class:`~attnlab.nn.DecoupledHeadAttention` with fewer key/value heads.

    Args:
        attn_module: ``nn.MultiheadAttention`` or an MHA-like module (module docstring).
        kv_heads: key and value head count G, or a pair (G_K, G_V) to group keys and values apart.
        method: ``"cluster"`` (DHA: Ward clustering of similar heads, mean fusion) or ``"mean"``
            (GQA: consecutive heads mean-pooled).
        calibration: inputs [..., dim] whose per-head key/value outputs define head similarity
            (``"cluster"`` only); by default heads are compared by their projection weights.

    With ``kv_heads`` equal to the head count both methods return the original function exactly.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    w = mha_weights(attn_module)
    gk, gv = _counts(kv_heads, w.heads)
    if method == "mean":
        if calibration is not None:
            raise ValueError("calibration is used by method='cluster' only")
        for name, g in (("key", gk), ("value", gv)):
            if w.heads % g:
                raise ValueError(f"method='mean' needs kv_heads to divide the {w.heads} heads, got {g} {name} heads")
        key_groups = tuple(h // (w.heads // gk) for h in range(w.heads))
        value_groups = tuple(h // (w.heads // gv) for h in range(w.heads))
    else:
        if calibration is not None and (not isinstance(calibration, Tensor) or calibration.shape[-1] != w.dim):
            got = getattr(calibration, "shape", calibration)
            raise ValueError(f"calibration must be a tensor [..., dim={w.dim}], got {got}")
        key_groups = cluster_heads(head_features(w.wk, w.bk, calibration), gk)
        value_groups = cluster_heads(head_features(w.wv, w.bv, calibration), gv)
    bias = any(t is not None for t in (w.bq, w.bk, w.bv, w.bo))
    out = DecoupledHeadAttention(
        w.dim,
        w.heads,
        key_groups=key_groups,
        value_groups=value_groups,
        head_dim=w.wk.shape[1],
        value_head_dim=w.wv.shape[1],
        bias=bias,
        device=w.wq.device,
        dtype=w.wq.dtype,
    )
    fused = {
        "q_proj": (w.wq, w.bq),
        "k_proj": _fuse(w.wk, w.bk, key_groups),
        "v_proj": _fuse(w.wv, w.bv, value_groups),
        "o_proj": (w.wo, w.bo),
    }
    with torch.no_grad():
        for name, (weight, b) in fused.items():
            layer = getattr(out, name)
            layer.weight.copy_(weight)
            if bias:
                layer.bias.copy_(torch.zeros_like(layer.bias) if b is None else b)
    return out


def attention_output(module: nn.Module, x: Tensor, *, causal: bool = False) -> Tensor:
    """Self-attention of an MHA-like or DHA module on x [B, T, dim] -> [B, T, dim]. Modules other than
    nn.MultiheadAttention are called as ``module(x)`` (``module(x, causal=True)`` when causal)."""
    if isinstance(module, nn.MultiheadAttention):
        xin = x if module.batch_first else x.transpose(0, 1)
        mask = ~causal_mask(x.shape[1], x.shape[1], x.device) if causal else None  # True = not allowed
        out = module(xin, xin, xin, attn_mask=mask, need_weights=False)[0]
        return out if module.batch_first else out.transpose(0, 1)
    return module(x, causal=True) if causal else module(x)


@torch.no_grad()
def conversion_error(original: nn.Module, converted: nn.Module, x: Tensor, *, causal: bool = False) -> float:
    """Relative L2 error ||converted(x) - original(x)|| / ||original(x)|| on inputs x [B, T, dim]."""
    want = attention_output(original, x, causal=causal).double()
    got = attention_output(converted, x, causal=causal).double()
    return ((got - want).norm() / want.norm()).item()
