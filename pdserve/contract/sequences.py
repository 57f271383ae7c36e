"""How many sequences a request carries, and which entry of a per-sequence field each one takes.

A request of P prompts with n choices each is P x n sequences; sequence k is prompt p's choice
j at k = p * n + j. A PD router sends one bootstrap room per sequence (router/pd.py), and the
server pairs each sequence with its entry (server/params.py):

    prompts   p0          p1
    choices   j0  j1  j2  j0  j1  j2      n = 3
    k         0   1   2   3   4   5       k = p * n + j
    a list of P x n values: entry k;  a list of P values: entry p (its n choices share it);
    a scalar: every sequence
"""

from __future__ import annotations

from typing import Any


def sequence_count(num_prompts: int, n: int) -> int:
    """Sequences (and PD rooms) of a request: each prompt's n choices."""
    return num_prompts * n


def per_sequence(value: Any, num_prompts: int, n: int) -> list[Any]:
    """One value per sequence (index p * n + j) from a scalar, a list per sequence, or a list per
    prompt; ValueError (one sentence, without the field's name) for a list of another length."""
    total = sequence_count(num_prompts, n)
    if not isinstance(value, list):
        return [value] * total
    if len(value) == total:
        return list(value)
    if len(value) == num_prompts:
        return [v for v in value for _ in range(n)]
    raise ValueError(f"lists {len(value)} values; the request has {total} sequences "
                     f"({num_prompts} prompts x n = {n})")
