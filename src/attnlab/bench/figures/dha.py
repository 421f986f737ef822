"""DHA figures: the conversion error table and the speed of decoupled groupings.

Conversion error (``error_table``): DHA's head clustering against GQA's mean pooling of consecutive
heads. Two MHA layers are converted at 2x and 4x key/value-head reduction and compared to the original on
random inputs (relative L2 error of the layer output, causal self-attention):

* ``random``: every projection at PyTorch's default init: the heads share no structure.
* ``structured``: key heads are noisy copies of a few key prototypes and value heads of a few value
  prototypes, each prototype's copies scattered over the heads (not consecutive), with independent
  K and V assignments. Trained models show such redundancy (the observation behind DHA); scattered
  copies are what consecutive pooling cannot see.

Speed (``grouping_timings``): ``mechanisms.dha.attention`` under several groupings against SDPA on
the per-head gathered keys and values (what a naive DHA does) and against plain MHA SDPA, timed
interleaved, causal forward, B1 H8 D64.

    PYTHONPATH=src python -m attnlab.bench.figures.dha
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnlab.bench.measure import time_interleaved
from attnlab.convert import conversion_error, to_dha
from attnlab.mechanisms import dha
from attnlab.nn import DecoupledHeadAttention


def prototype_assignment(heads: int, prototypes: int, generator: torch.Generator) -> list[int]:
    """Each prototype on heads // prototypes heads, in a random order."""
    labels = torch.arange(heads) % prototypes
    return labels[torch.randperm(heads, generator=generator)].tolist()


def prototype_mha(
    dim: int = 64, heads: int = 8, prototypes: int = 4, noise: float = 0.1, seed: int = 0
) -> tuple[DecoupledHeadAttention, list[int], list[int]]:
    """An MHA layer whose key (value) heads are prototype + noise * N(0, std) copies; also returns the
    planted key and value assignments (query head -> prototype)."""
    g = torch.Generator().manual_seed(seed)
    mha = DecoupledHeadAttention(dim, heads, bias=True)
    D = dim // heads
    std = dim**-0.5
    assignments = []
    with torch.no_grad():
        for layer in (mha.q_proj, mha.k_proj, mha.v_proj, mha.o_proj):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * std)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * std)
        for layer in (mha.k_proj, mha.v_proj):
            labels = prototype_assignment(heads, prototypes, g)
            assignments.append(labels)
            base = torch.randn(prototypes, D, dim + 1, generator=g) * std  # weights | bias
            heads_wb = base[labels] + noise * std * torch.randn(heads, D, dim + 1, generator=g)
            layer.weight.copy_(heads_wb[..., :dim].flatten(0, 1))
            layer.bias.copy_(heads_wb[..., dim].flatten())
    return mha, assignments[0], assignments[1]


def error_table(
    dim: int = 64, heads: int = 8, reductions=(2, 4), batch: int = 4, tokens: int = 128, seed: int = 0
) -> list[dict]:
    """Rows {model, reduction, kv_heads, method, error} (error = relative L2, causal, on held-out x)."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, tokens, dim, generator=g)
    calibration = torch.randn(batch, tokens, dim, generator=g)  # a separate draw from the inputs
    torch.manual_seed(seed)
    models = {"random": DecoupledHeadAttention(dim, heads, bias=True), "structured": prototype_mha(dim, heads)[0]}
    rows = []
    for model, mha in models.items():
        for r in reductions:
            variants = {
                "mean (GQA)": to_dha(mha, heads // r, method="mean"),
                "cluster weights (DHA)": to_dha(mha, heads // r),
                "cluster calibrated (DHA)": to_dha(mha, heads // r, calibration=calibration),
            }
            for method, converted in variants.items():
                err = conversion_error(mha, converted, x, causal=True)
                rows.append({"model": model, "reduction": r, "kv_heads": heads // r, "method": method, "error": err})
    return rows


GROUPINGS = {  # name: (key_groups, value_groups) over 8 query heads
    "MHA (identity)": (tuple(range(8)), tuple(range(8))),
    "GQA 2 kv heads": ((0, 0, 0, 0, 1, 1, 1, 1),) * 2,
    "K strided / V contiguous, 2+2": ((0, 1, 0, 1, 0, 1, 0, 1), (0, 0, 0, 0, 1, 1, 1, 1)),
    "unequal: K 3 heads (4,2,2), V 2 (5,3)": ((0, 1, 0, 2, 0, 1, 0, 2), (0, 0, 1, 0, 1, 0, 1, 0)),
}


def grouping_timings(T: int = 4096, budget: float = 2.0) -> list[dict]:
    """Rows {grouping, dha_ms, vs_gathered, vs_mha}: ratios are baseline time / DHA time."""
    rows = []
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, T, 64, generator=g)
    mha_k, mha_v = torch.randn(2, 1, 8, T, 64, generator=g)
    for name, (kg, vg) in GROUPINGS.items():
        k = torch.randn(1, max(kg) + 1, T, 64, generator=g)
        v = torch.randn(1, max(vg) + 1, T, 64, generator=g)

        def ours(k=k, v=v, kg=kg, vg=vg):
            with torch.no_grad():
                dha.attention(q, k, v, causal=True, key_groups=kg, value_groups=vg)

        def gathered(k=k, v=v, kg=kg, vg=vg):
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k[:, list(kg)], v[:, list(vg)], is_causal=True)

        def mha():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, mha_k, mha_v, is_causal=True)

        t_ours, t_gathered, t_mha = time_interleaved([ours, gathered, mha], budget=budget)
        rows.append(
            {
                "grouping": name,
                "dha_ms": t_ours.median * 1e3,
                "vs_gathered": t_gathered.median / t_ours.median,
                "vs_mha": t_mha.median / t_ours.median,
            }
        )
    return rows


def main() -> None:
    rows = error_table()
    print("| model | KV reduction | method | relative L2 error |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['reduction']}x ({r['kv_heads']} kv heads) | {r['method']} | {r['error']:.4f} |")
    print(f"\n{torch.get_num_threads()} threads, T=4096, causal fwd; ratio = baseline time / DHA time")
    print("| grouping | DHA ms | x SDPA on gathered k/v | x SDPA MHA |")
    print("|---|---|---|---|")
    for r in grouping_timings():
        print(f"| {r['grouping']} | {r['dha_ms']:.0f} | {r['vs_gathered']:.2f} | {r['vs_mha']:.2f} |")


if __name__ == "__main__":
    main()
