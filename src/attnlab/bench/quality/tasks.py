"""Task generators for the quality suite (spec/quality.md §1.1, §2.1, §2.3, §5.2).

Every generator is a pure function of its settings and a seed and returns a :class:`TaskData`:

* ``inputs``  long [n, L] token ids (float [n, L, F] for in-context regression);
* ``labels``  long [n, L]: -100 everywhere except the scored positions (float [n, L] for regression,
  NaN where unscored);
* ``answer``  long [n, L]: at a scored position, the position of the token it must retrieve; -1
  elsewhere (and for regression, where the answer is the whole context). The key-query distance is
  ``position - answer``;
* ``slice_``  long [n, L]: the value the accuracy is sliced by at each scored position (the distance
  for recall tasks, the number of in-context pairs for regression).

The format is the "direct" one: the label sits at the position whose input is the query token, which
is the Zoology next-token format (labels = inputs shifted by one) written without the shift.
Train and test sets come from disjoint seed ranges (:func:`split_seeds`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

IGNORE = -100
TEST_SEED_BASE = 1 << 31  # train seeds live below, test seeds at and above: the ranges never meet


class TaskData(NamedTuple):
    inputs: Tensor
    labels: Tensor
    answer: Tensor
    slice_: Tensor


def split_seeds(seed: int) -> tuple[int, int]:
    """(train seed, test seed) for one run seed; the test set is shared by every training seed."""
    if not 0 <= seed < TEST_SEED_BASE:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    return seed, TEST_SEED_BASE


def _gen(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 7919 + salt)


def _rank_choice(weights: Tensor, n: int, k: int, g: torch.Generator) -> Tensor:
    """k distinct indices per row out of len(weights), drawn one after another with probability
    proportional to ``weights`` among those left (numpy's choice without replacement): [n, k]."""
    return torch.multinomial(weights.expand(n, -1), k, replacement=False, generator=g)


def _distinct(n: int, k: int, lo: int, hi: int, g: torch.Generator) -> Tensor:
    """k distinct integers from [lo, hi) per row, uniformly: [n, k]."""
    return torch.rand(n, hi - lo, generator=g).argsort(dim=1)[:, :k] + lo


def mqar(
    n: int,
    seed: int,
    *,
    seq_len: int = 128,
    pairs: int = 8,
    vocab: int = 2048,
    alpha: float = 0.01,
    distractors: int = 0,
    random_fillers: bool = True,
) -> TaskData:
    """Multi-query associative recall, spec §1.1 (Zoology ``multiquery_ar``).

    Keys come from {1..V/2-1}, values from {V/2..V-1}, each distinct within a sequence. The first
    2(N+D) tokens are the pairs k1 v1 ... ; N of them (all when ``distractors`` D = 0, else a
    uniform subset, kept in order) are queried once each in the remaining region, query i at offset
    2 g_i with the gaps g drawn without replacement from {0..(L-2(N+D))/2-1} with probability
    proportional to (g+1)^(alpha-1). Every other position is a filler: uniform over the whole
    vocabulary (``random_fillers``) or 0. The label at a query is its key's value; the answer
    position is that value's position.
    """
    total = pairs + distractors
    region = seq_len - 2 * total
    if seq_len % 2 or vocab <= seq_len or pairs < 1 or distractors < 0 or region < 2 * pairs:
        raise ValueError(
            f"mqar needs an even seq_len < vocab and 2*(pairs+distractors) + 2*pairs <= seq_len; got "
            f"seq_len={seq_len}, vocab={vocab}, pairs={pairs}, distractors={distractors}"
        )
    g = _gen(seed, 1)
    keys = _distinct(n, total, 1, vocab // 2, g)  # [n, P]
    values = _distinct(n, total, vocab // 2, vocab, g)  # [n, P]
    if random_fillers:
        inputs = torch.randint(0, vocab, (n, seq_len), generator=g)
    else:
        inputs = torch.zeros(n, seq_len, dtype=torch.long)
    inputs[:, 0 : 2 * total : 2], inputs[:, 1 : 2 * total : 2] = keys, values
    # which pairs are queried: all of them, or N of the N + D in pair order
    asked = torch.arange(pairs).expand(n, -1) if not distractors else _distinct(n, pairs, 0, total, g).sort(1).values
    gaps = (torch.arange(region // 2, dtype=torch.float64) + 1) ** (alpha - 1)
    qpos = 2 * total + 2 * _rank_choice(gaps, n, pairs, g)  # [n, N] query positions
    rows = torch.arange(n).unsqueeze(1)
    inputs[rows, qpos] = keys.gather(1, asked)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    labels[rows, qpos] = values.gather(1, asked)
    answer = torch.full((n, seq_len), -1, dtype=torch.long)
    answer[rows, qpos] = 2 * asked + 1
    return TaskData(inputs, labels, answer, _distance(answer))


def passkey(n: int, seed: int, *, seq_len: int = 256, key_vocab: int = 128, filler_vocab: int = 126) -> TaskData:
    """Token passkey (spec §2.1, §5.2 T4): uniform noise fillers, one needle ``MARK k1 k2`` at a depth
    uniform in [0, 1], and at the end ``QUERY k1``: the label at QUERY is k1, at the (teacher-forced)
    k1 it is k2. Keys come from their own sub-vocabulary [0, key_vocab); fillers from the next
    ``filler_vocab`` ids; MARK and QUERY are the last two ids (vocab = key_vocab + filler_vocab + 2).
    ``slice_`` is the needle's depth in percent (0: start of the sequence)."""
    if seq_len < 8:
        raise ValueError(f"passkey needs seq_len >= 8, got {seq_len}")
    g = _gen(seed, 2)
    mark, query = key_vocab + filler_vocab, key_vocab + filler_vocab + 1
    inputs = torch.randint(key_vocab, key_vocab + filler_vocab, (n, seq_len), generator=g)
    key = torch.randint(0, key_vocab, (n, 2), generator=g)
    room = seq_len - 2 - 3  # the needle (3 tokens) ends before the query (2 tokens)
    start = torch.randint(0, room + 1, (n,), generator=g)
    rows = torch.arange(n)
    inputs[rows, start], inputs[rows, start + 1], inputs[rows, start + 2] = mark, key[:, 0], key[:, 1]
    inputs[:, -2], inputs[:, -1] = query, key[:, 0]
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    labels[:, -2], labels[:, -1] = key[:, 0], key[:, 1]
    answer = torch.full((n, seq_len), -1, dtype=torch.long)
    answer[:, -2], answer[:, -1] = start + 1, start + 2
    depth = (start * 100 // max(room, 1)).view(n, 1).expand(n, seq_len)
    return TaskData(inputs, labels, answer, torch.where(answer >= 0, depth, -1))


def selective_copy(n: int, seed: int, *, seq_len: int = 256, copies: int = 16, vocab: int = 16) -> TaskData:
    """Selective copying in the MAD setting (spec §2.3): ``copies`` data tokens from [0, vocab-2) at
    random positions of a blank context (blank = vocab-2), then COPY (= vocab-1) and the data
    tokens teacher-forced. The label at COPY is the first data token, at the i-th copied token the
    (i+1)-th; the answer position is where that token sits in the context."""
    context = seq_len - copies
    if copies < 1 or context < copies or vocab < 3:
        raise ValueError(f"selective_copy needs 1 <= copies <= seq_len/2 and vocab >= 3; got {copies}, {vocab}")
    g = _gen(seed, 3)
    blank, copy = vocab - 2, vocab - 1
    data = torch.randint(0, vocab - 2, (n, copies), generator=g)
    where = _distinct(n, copies, 0, context, g).sort(1).values  # [n, M] positions in the context
    inputs = torch.full((n, seq_len), blank, dtype=torch.long)
    rows = torch.arange(n).unsqueeze(1)
    inputs[rows, where] = data
    inputs[:, context] = copy
    inputs[:, context + 1 :] = data[:, :-1]
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    labels[:, context:] = data
    answer = torch.full((n, seq_len), -1, dtype=torch.long)
    answer[:, context:] = where
    return TaskData(inputs, labels, answer, _distance(answer))


def linear_regression(n: int, seed: int, *, points: int = 16, dim: int = 8, noise: float = 0.0) -> TaskData:
    """In-context linear regression (Garg et al., arXiv 2208.01066): per sequence w ~ N(0, I_dim),
    x_i ~ N(0, I_dim), y_i = w.x_i (+ noise). Tokens alternate x-tokens [x_i, 0, 1] and y-tokens
    [0, y_i, 0] (features: dim + 2, the last a token-type flag), so L = 2 * points. The target at
    the x-token of pair i >= 1 is y_i, predicted from the i pairs before it; ``slice_`` is i."""
    if points < 2 or dim < 1:
        raise ValueError(f"linear_regression needs points >= 2 and dim >= 1, got {points}, {dim}")
    g = _gen(seed, 4)
    w = torch.randn(n, dim, 1, generator=g)
    x = torch.randn(n, points, dim, generator=g)
    y = (x @ w).squeeze(-1) + noise * torch.randn(n, points, generator=g)  # [n, points]
    inputs = torch.zeros(n, 2 * points, dim + 2)
    inputs[:, 0::2, :dim], inputs[:, 0::2, dim + 1] = x, 1.0
    inputs[:, 1::2, dim] = y
    labels = torch.full((n, 2 * points), float("nan"))
    labels[:, 2::2] = y[:, 1:]
    slice_ = torch.full((n, 2 * points), -1, dtype=torch.long)
    slice_[:, 2::2] = torch.arange(1, points)
    return TaskData(inputs, labels, torch.full((n, 2 * points), -1, dtype=torch.long), slice_)


def _distance(answer: Tensor) -> Tensor:
    pos = torch.arange(answer.shape[1]).expand_as(answer)
    return torch.where(answer >= 0, pos - answer, -1)


def scored(data: TaskData) -> Tensor:
    """bool [n, L]: the positions that carry a label."""
    if data.labels.is_floating_point():
        return ~data.labels.isnan()
    return data.labels != IGNORE


def overlap(train: TaskData, test: TaskData) -> int:
    """How many test sequences also appear, token for token, in the training set."""
    seen = {bytes(row.numpy().tobytes()) for row in train.inputs}
    return sum(bytes(row.numpy().tobytes()) in seen for row in test.inputs)


GENERATORS = {"mqar": mqar, "passkey": passkey, "selective_copy": selective_copy, "regression": linear_regression}


def make(kind: str, n: int, seed: int, **settings) -> TaskData:
    if kind not in GENERATORS:
        raise ValueError(f"unknown task kind {kind!r}; valid: {', '.join(GENERATORS)}")
    return GENERATORS[kind](n, seed, **settings)
