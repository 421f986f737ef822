"""The quality-suite model (spec/quality.md §5.2) and its size accounting.

    tokens [B, L] -> embedding (or a linear map of real-valued tokens) -> x [B, L, d]
    x = x + dwconv3(LN(x))                       short causal depthwise conv: the one-token shift
    x = x + Attention(LN(x))                     the mechanism under test, causal, no position embedding
    h = LN(x)[scored positions] -> head          logits [M, V] (or [M, 1] for regression)

No MLP, no position embedding (the conv supplies relative shift, as in Zoology/Based). A layer
policy (``quality.policies``) replaces the one mixer line with one such line per policy layer. The token
embedding starts at N(0, 0.02) (GPT-2's, as in Zoology); every other module keeps PyTorch's default
init, so the mixer is exactly the ``attnlab.nn.Attention`` a user builds. Both alternatives we
measured learn MQAR slower (L=128, 6 epochs, seed 0; the spec pilot's figures in brackets):

* GPT-2 init everywhere (projections N(0, 0.02)): q and k start so small that elu+1 features are
  nearly constant and linear attention's weights nearly uniform. Linear N=16 at lr 3e-3 sat at
  chance for one seed in three (0.001 / 0.779 / 0.728); the ladder at lr 1e-2 read 0.76 / 0.63 /
  0.69 / 0.00; a 16-token window stayed at chance.
* PyTorch's default everywhere: the N(0, 1) embedding dwarfs the branches in the residual stream;
  linear N=16 reached 0.24.
* This init (the quick preset, lr 3e-3): linear N=4 / 8 / 16 / 32 = 0.926 / 0.882 / 0.810 / 0.573
  (0.949 / 0.915 / 0.873 / 0.668); windows 16 / 32 / 64 = 0.334 / 0.598 / 0.812 at caps 0.333 /
  0.598 / 0.812; dense T1 0.997 at epoch 3.

The conv is ungated: a gated variant (Based's BaseConv, dwconv(h) * W h) learned T1 worse here
(dense 0.943 vs 0.989 after 6 epochs at lr 3e-3, same seed). The head runs on the scored positions
only: the loss is the same (every other label is ignored) and with a large vocabulary the head would
otherwise dominate the cost.

State size (bytes, fp32) of the mixer at test length L, the x-axis of Zoology/Based plots:

* softmax under a static mask (one softmax, no oracle, no selection): a KV cache of 2 * d * 4 bytes
  per key a query can see, at most: ``2 * d * 4 * max_row(mask)`` (dense: L, a window: w);
* softmax that chooses among all keys at run time (data-dependent selection, pooled or mixed
  composites): the full cache, ``2 * L * d * 4``;
* linear kind (``Kind.LINEAR``, ``fixed_state``): per head the state
  phi(k)^T v [dh, dh] and the normalizer z [dh]: ``heads * dh * (dh + 1) * 4``.
The conv's own state (2 * d floats) is the same for every mechanism and left out.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab import registry
from attnlab.nn import Attention
from attnlab.nn.lm import attend, layer_attention
from attnlab.nn.router import sparsity_loss
from attnlab.policy import Policy
from attnlab.spec import Kind

EMBED_STD = 0.02  # GPT-2's / Zoology's initializer_range, for the token embedding only


class ShortConv(nn.Module):
    """Causal depthwise conv over time: out[t] = sum_i w[i] * x[t - k + 1 + i] (+ bias)."""

    def __init__(self, dim: int, kernel: int = 3):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim)

    def forward(self, x: Tensor) -> Tensor:  # [B, L, d] -> [B, L, d]
        x = F.pad(x.transpose(1, 2), (self.kernel - 1, 0))  # left pad only: causal
        return self.conv(x).transpose(1, 2)


class RecallOutput(NamedTuple):
    logits: Tensor  # [M, out]: the head at the scored positions, row-major
    aux_loss: Tensor  # Flux routers' sparsity loss (0 without routed layers); add it to the task loss
    routes: Tensor | None  # [B, routed layers]: 1 = full attention, 0 = sparse; None without routers


class RecallModel(nn.Module):
    """``RecallModel(vocab, mixer, options, dim=64, heads=1, in_features=None, out_features=None)``.

    ``mixer`` is a mechanism name (one mixer layer with ``options``) or a ``Policy``: one pre-norm
    residual mixer layer per policy layer, after the conv, as ``attnlab.nn.TransformerLM`` builds
    them (Flux routing, HyLRA selection reuse) but with no MLP and no positions.
    ``forward(inputs, scored) -> RecallOutput`` with M = scored.sum() rows. Token inputs (long
    [B, L]) need ``vocab``; real-valued inputs (float [B, L, in_features]) use a linear embedding,
    and ``out_features`` sets the head's width (default: vocab).
    """

    def __init__(
        self,
        vocab: int | None,
        mixer: str | Policy,
        options: dict | None = None,
        *,
        dim: int = 64,
        heads: int = 1,
        in_features: int | None = None,
        out_features: int | None = None,
        conv_kernel: int = 3,
        sparsity_target: float = 0.5,
    ):
        super().__init__()
        self.embed = nn.Linear(in_features, dim) if in_features else nn.Embedding(vocab, dim)
        self.conv_norm, self.conv = nn.LayerNorm(dim), ShortConv(dim, conv_kernel)
        if isinstance(mixer, Policy):
            if options:
                raise ValueError("options go into the policy's layers; pass options=None with a Policy")
            mixers = [layer_attention(dim, heads, None, layer, rope=False) for layer in mixer.layers]
            self.reuse = [layer.reuse for layer in mixer.layers]
        else:  # options as given (tuples, tensors): no policy round trip through JSON values
            mixers, self.reuse = [Attention(dim, heads, mechanism=mixer, causal=True, **(options or {}))], [None]
        self.mix_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in mixers)
        self.mixers = nn.ModuleList(mixers)
        self.sparsity_target = sparsity_target
        self.out_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_features or vocab)
        if isinstance(self.embed, nn.Embedding):  # a real-valued input's linear map keeps the default
            nn.init.normal_(self.embed.weight, std=EMBED_STD)

    def hidden(self, inputs: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(LN(x) [B, L, d] before the head, the auxiliary loss, the routers' choices)."""
        x = self.embed(inputs)  # [B, L, d]
        x = x + self.conv(self.conv_norm(x))
        selections, zs = {}, []
        for i, (norm, mixer) in enumerate(zip(self.mix_norms, self.mixers)):
            h, z = attend(mixer, norm(x), selections, i, self.reuse[i])
            x = x + h
            if z is not None:
                zs.append(z)
        if not zs:
            return self.out_norm(x), x.new_zeros(()), None
        return self.out_norm(x), sparsity_loss(zs, self.sparsity_target), torch.stack(zs, 1)

    def forward(self, inputs: Tensor, scored: Tensor) -> RecallOutput:
        h, aux, routes = self.hidden(inputs)
        return RecallOutput(self.head(h[scored]), aux, routes)  # [M, d] -> [M, out]


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def is_linear_family(name: str) -> bool:
    mech = registry.get(name)
    return mech.fixed_state  # a d x d state; every other kind keeps a KV cache


def static_mask(name: str, seq_len: int, options: dict) -> Tensor | None:
    """bool [L, L]: the keys each query may see when the mechanism is one softmax under a fixed mask
    (per-head patterns: the union over heads); None for data-dependent, composite or linear ones,
    whose output is not confined to a mask."""
    mech = registry.get(name)
    if mech.kind is not Kind.MASK:
        return None
    return mech.dense_mask(seq_len, seq_len, causal=True, **options).flatten(0, 1).any(0)  # [B|1, Hkv|1, L, L]


def state_bytes(name: str, seq_len: int, dim: int, heads: int, options: dict) -> int:
    """Bytes of the mixer's decoding state at length ``seq_len`` (the module docstring's rule)."""
    if is_linear_family(name):
        dh = dim // heads
        return heads * dh * (dh + 1) * 4
    m = static_mask(name, seq_len, options)
    keys = seq_len if m is None else int(m.sum(-1).max())
    return 2 * keys * dim * 4


@torch.no_grad()
def predict(model: RecallModel, inputs: Tensor, scored: Tensor, batch: int = 256) -> tuple[Tensor, Tensor | None]:
    """The model's outputs at the scored positions of every row, batched, on the CPU: ([M, out], the
    routers' choices [N, routed layers] or None)."""
    model.eval()
    dev = next(model.parameters()).device
    outs = [model(inputs[i : i + batch].to(dev), scored[i : i + batch].to(dev)) for i in range(0, len(inputs), batch)]
    model.train()
    routes = None if outs[0].routes is None else torch.cat([o.routes.cpu() for o in outs])
    return torch.cat([o.logits.cpu() for o in outs]), routes
