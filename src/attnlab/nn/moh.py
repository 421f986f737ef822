"""Mixture-of-Head attention (MoH; Jin, Zhu, Yuan, Yan, "MoH: Multi-Head Attention as Mixture-of-Head
Attention", arXiv 2410.11842), spec §1.

Multi-head attention's output is a sum over heads, ``y = Σ_i O_i W_O^i``; MoH makes it a gated sum
with a gate per token and head. Heads ``0..h_s-1`` are shared (always on); the other ``h_r = H - h_s``
are routed, and each token activates the ``top_k`` of them its router prefers. With the default
``gate_normalization="code"`` (the released code, which produced the checkpoints), per token t::

    p_r = softmax(x_t W_r)                                        # [h_r], router over routed heads
    S_t = top_k(p_r)                                              # ties: the higher head index wins
    g_r = top_k * 1[i in S_t] p_r[i] / max(Σ_{j in S_t} p_r[j], tiny)   # an active head's mean gate is 1
    g_s = h_s * softmax(x_t W_s)         (h_s > 1);   g_s = 1     (h_s == 1)
    α   = 2 * softmax(x_t W_h)           (only when h_s > 0 and h_r > 0)
    g   = [α_1 g_s, α_2 g_r]             (g = g_r when h_s == 0, g = g_s when h_r == 0)
    y_t = W_O [g_i O_i(t)]_i

``gate_normalization="paper"`` drops the constants and the renormalization: ``g_s = softmax(x W_s)``,
``g_r = 1[i in S_t] p_r[i]``, ``α = softmax(x W_h)`` (α = 1 when one kind of head is absent).

The load-balance loss (code) over all B*T tokens, with ``E = h_r``::

    P_i = mean_t p_r[t, i],   f_i = mean_t 1[i in S_t],   L_b = E * Σ_i P_i f_i

``forward`` always returns ``MoHOutput(output, aux_loss)`` with ``aux_loss = L_b`` unscaled (a 0
tensor when there are no routed heads); the training objective of the paper is
``L_task + β * mean over MoH layers of L_b`` with β = 0.01, which the caller assembles. Perfectly
uniform routing gives ``L_b = top_k`` (spec §1.8), not 1. ``route(x)`` returns the gates alone.

Spec §1.7 resolutions: code constants by default, paper ones by option; top-k taken on the router
probabilities (same order as on logits) with the library's tie rule (score descending, then head
index descending: with a uniform router the highest routed heads win); inactive heads are computed
then zeroed with ``torch.where`` (exact 0 in any dtype, whatever their attention rows hold); for
``h_s == 1`` the shared gate is 1 (the ViT code; the DiT code references an undefined router).
The attention core is ``attnlab.attention`` with any registered mechanism; the gating is
``attnlab.mechanisms.moh.gate_heads``, the same function behind the registered ``moh`` mechanism.
Router weights use PyTorch's default Linear initialization. MoH-LLaMA3's parameter-free router
(query norms, spec §1.4) is not included.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from attnlab.core import compute_dtype, nonnegative_int, positive_int
from attnlab.mechanisms.moh import gate_heads
from attnlab.nn.attention import Attention


class Routing(NamedTuple):
    gates: Tensor  # [B, T, H] in x's dtype, shared heads first; exactly 0 for routed heads not selected
    probs: Tensor  # [B, T, h_r] router probabilities p_r, in >= fp32
    selected: Tensor  # bool [B, T, h_r]: the top_k routed heads of each token


class MoHOutput(NamedTuple):
    output: Tensor  # [B, T, dim]
    aux_loss: Tensor  # scalar load-balance loss L_b (unscaled; the paper adds 0.01 * mean over layers)


def top_k_mask(p: Tensor, k: int) -> Tensor:
    """bool [..., E]: the k largest entries of p, ties broken toward the higher index (library rule)."""
    E = p.shape[-1]
    order = torch.sort(p.flip(-1), dim=-1, descending=True, stable=True).indices[..., :k]  # stable: first wins
    return torch.zeros_like(p, dtype=torch.bool).scatter_(-1, E - 1 - order, True)  # flipped back


def load_balance_loss(probs: Tensor, selected: Tensor) -> Tensor:
    """``E * Σ_i P_i f_i`` over every token: probs, selected [..., E]."""
    E = probs.shape[-1]
    if E == 0:
        return probs.new_zeros(())
    P = probs.reshape(-1, E).mean(0)  # [E] mean router probability
    f = selected.reshape(-1, E).to(probs.dtype).mean(0)  # [E] fraction of tokens that selected head i
    return E * (P * f).sum()


class MoHAttention(nn.Module):
    """``MoHAttention(dim, heads, kv_heads=None, mechanism="dense", *, shared_heads=heads // 2,
    top_k=max(1, routed // 2), gate_normalization="code", **attention_kwargs)``; the remaining
    keywords (rope, causal, bias, kv_dim, scale, mechanism options) go to ``attnlab.nn.Attention``.

    ``forward(x, kv=None, *, positions=None, kv_positions=None) -> MoHOutput(output, aux_loss)``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int | None = None,
        mechanism: str = "dense",
        *,
        shared_heads: int | None = None,
        top_k: int | None = None,
        gate_normalization: str = "code",
        **attention_kwargs,
    ):
        super().__init__()
        heads = positive_int("heads", heads)
        shared = heads // 2 if shared_heads is None else nonnegative_int("shared_heads", shared_heads)
        if shared > heads:
            raise ValueError(f"shared_heads must be <= heads={heads}, got {shared}")
        routed = heads - shared
        if top_k is None:
            top_k = max(1, routed // 2) if routed else 0
        elif routed == 0:
            if nonnegative_int("top_k", top_k) != 0:
                raise ValueError(f"top_k must be 0 when every head is shared (0 routed heads), got {top_k}")
        elif positive_int("top_k", top_k) > routed:
            raise ValueError(f"top_k must be <= the routed heads heads - shared_heads = {routed}, got {top_k}")
        if gate_normalization not in ("code", "paper"):
            raise ValueError(f"gate_normalization must be 'code' or 'paper', got {gate_normalization!r}")
        self.attention = Attention(dim, heads, kv_heads, mechanism, **attention_kwargs)
        self.shared_heads, self.routed_heads, self.top_k = shared, routed, top_k
        self.gate_normalization = gate_normalization
        self.router = nn.Linear(dim, routed, bias=False) if routed else None  # W_r
        self.shared_router = nn.Linear(dim, shared, bias=False) if shared > 1 else None  # W_s
        self.balance = nn.Linear(dim, 2, bias=False) if shared and routed else None  # W_h: shared vs routed

    def route(self, x: Tensor) -> Routing:
        """Gates for x [B, T, dim] (the query-side tokens)."""
        ct, code = compute_dtype(x.dtype), self.gate_normalization == "code"
        B, T, _ = x.shape
        parts = []
        if self.shared_heads:
            if self.shared_router is None:  # one shared head: gate 1
                g_s = torch.ones(B, T, 1, dtype=ct, device=x.device)
            else:
                g_s = torch.softmax(self.shared_router(x).to(ct), dim=-1)  # [B, T, h_s]
                g_s = self.shared_heads * g_s if code else g_s
            parts.append(g_s)
        if self.routed_heads:
            probs = torch.softmax(self.router(x).to(ct), dim=-1)  # [B, T, h_r]
            selected = top_k_mask(probs, self.top_k)
            kept = torch.where(selected, probs, torch.zeros((), dtype=ct, device=x.device))
            if code:  # renormalize over the selected heads so an active head's mean gate is 1
                kept = self.top_k * kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(ct).tiny)
            parts.append(kept)
        else:
            probs = torch.zeros(B, T, 0, dtype=ct, device=x.device)
            selected = torch.zeros(B, T, 0, dtype=torch.bool, device=x.device)
        if self.balance is not None:
            alpha = torch.softmax(self.balance(x).to(ct), dim=-1)  # [B, T, 2]
            alpha = 2 * alpha if code else alpha
            parts = [parts[0] * alpha[..., :1], parts[1] * alpha[..., 1:]]
        return Routing(torch.cat(parts, dim=-1).to(x.dtype), probs, selected)

    def forward(
        self,
        x: Tensor,
        kv: Tensor | None = None,
        *,
        positions: Tensor | None = None,
        kv_positions: Tensor | None = None,
    ) -> MoHOutput:
        attn = self.attention
        q, k, v = attn.project(x, kv, positions, kv_positions)
        routing = self.route(x)
        o = gate_heads(attn.attend(q, k, v), routing.gates.transpose(1, 2).unsqueeze(-1))  # [B, H, T, Dh]
        return MoHOutput(attn.merge_heads(o), load_balance_loss(routing.probs, routing.selected))

    def extra_repr(self) -> str:
        return (
            f"shared_heads={self.shared_heads}, routed_heads={self.routed_heads}, top_k={self.top_k}, "
            f"gate_normalization={self.gate_normalization!r}"
        )
