"""MHA -> DHA conversion error: DHA's head clustering against GQA's mean pooling of consecutive heads.

Two MHA layers are converted at 2x and 4x key/value-head reduction and compared to the original on
random inputs (relative L2 error of the layer output, causal self-attention):

* ``random``: every projection at PyTorch's default init: the heads share no structure.
* ``structured``: key heads are noisy copies of a few key prototypes and value heads of a few value
  prototypes, each prototype's copies scattered over the heads (not consecutive), with independent
  K and V assignments. Trained models show such redundancy (the observation behind DHA); scattered
  copies are what consecutive pooling cannot see.

    PYTHONPATH=src python -m attnlab.bench.conversion
"""

from __future__ import annotations

import torch

from attnlab.convert import conversion_error, to_dha
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
            for method, dha in variants.items():
                err = conversion_error(mha, dha, x, causal=True)
                rows.append({"model": model, "reduction": r, "kv_heads": heads // r, "method": method, "error": err})
    return rows


def main() -> None:
    rows = error_table()
    print("| model | KV reduction | method | relative L2 error |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['reduction']}x ({r['kv_heads']} kv heads) | {r['method']} | {r['error']:.4f} |")


if __name__ == "__main__":
    main()
