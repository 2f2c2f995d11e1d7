"""Exact order statistics of a model-wide stream of float32 values, in two passes.

Methods such as TIES and PCB trim each task vector by a quantile taken over the whole model,
which the reference code computes with one sort of the flattened model (T × 88M floats for a
ViT-B/32). Here the model is read tensor by tensor instead, twice: the first pass counts the
values by the high 16 bits of an order-preserving 32-bit key, which locates the bucket of
each wanted rank; the second counts the low 16 bits inside that bucket, which pins the
value down exactly. Memory is two 65,536-bin histograms per wanted rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

_BINS = 1 << 16
_SIGN = 1 << 31


def _keys(values: torch.Tensor) -> torch.Tensor:
    """Order-preserving unsigned keys (int64 in [0, 2³²)) of float32 values: positives get
    the sign bit set, negatives have every bit flipped."""
    bits = values.detach().to(torch.float32).reshape(-1).contiguous().view(torch.int32)
    bits = bits.to(torch.int64)
    return torch.where(bits >= 0, bits + _SIGN, bits.bitwise_not())


def _value(key: int) -> float:
    bits = key - _SIGN if key >= _SIGN else ~key
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


class OrderStatistics:
    """Values at 0-based ascending ranks of a multiset of float32 values seen twice.

    Call :meth:`observe` with every chunk of values, :meth:`next_pass` with the wanted ranks
    (the first pass's :attr:`count` is known by then), :meth:`observe` the same chunks again,
    and read :meth:`values`. NaNs sort above +inf (as their bit patterns do), so callers
    reject them first.
    """

    def __init__(self):
        self.ranks: list[int] = []
        self.count = 0
        self._pass = 1
        self._high = torch.zeros(_BINS, dtype=torch.int64)
        self._buckets: list[int] = []
        self._residual: list[int] = []
        self._low: list[torch.Tensor] = []

    def observe(self, values: torch.Tensor) -> None:
        keys = _keys(values).cpu()
        if self._pass == 1:
            self.count += keys.numel()
            self._high += torch.bincount(keys >> 16, minlength=_BINS)
            return
        high = keys >> 16
        for bucket, low in zip(self._buckets, self._low, strict=True):
            inside = keys[high == bucket]
            if inside.numel():
                low += torch.bincount(inside & (_BINS - 1), minlength=_BINS)

    def next_pass(self, ranks: Sequence[int]) -> None:
        if self._pass != 1:
            raise RuntimeError("OrderStatistics takes exactly two passes")
        self.ranks = list(ranks)
        for rank in self.ranks:
            if not 0 <= rank < self.count:
                raise ValueError(f"rank {rank} is outside a stream of {self.count} values")
        cumulative = torch.cumsum(self._high, 0)
        for rank in self.ranks:
            bucket = int(torch.searchsorted(cumulative, rank, right=True))
            below = int(cumulative[bucket - 1]) if bucket else 0
            self._buckets.append(bucket)
            self._residual.append(rank - below)
            self._low.append(torch.zeros(_BINS, dtype=torch.int64))
        self._pass = 2

    def values(self) -> list[float]:
        if self._pass != 2:
            raise RuntimeError("values are known after the second pass")
        out = []
        for bucket, residual, low in zip(self._buckets, self._residual, self._low, strict=True):
            low_bits = int(torch.searchsorted(torch.cumsum(low, 0), residual, right=True))
            out.append(_value((bucket << 16) | low_bits))
        return out


def per_task_order_statistics(
    passes: Callable[[], Iterable[Sequence[torch.Tensor]]],
    ranks: Callable[[int], Sequence[int]],
) -> list[list[float]]:
    """Order statistics of T streams read side by side.

    ``passes()`` starts a pass and yields, chunk by chunk, one tensor of values per stream;
    ``ranks(count)`` gives the wanted 0-based ranks once a stream's length is known. Returns,
    per stream, the values at those ranks."""
    stats: list[OrderStatistics] = []
    for pass_number in (1, 2):
        for chunk in passes():
            if not stats:
                stats = [OrderStatistics() for _ in chunk]
            for stat, values in zip(stats, chunk, strict=True):
                stat.observe(values)
        if pass_number == 1:
            for stat in stats:
                stat.next_pass(ranks(stat.count))
    return [stat.values() for stat in stats]


_SAMPLE = 1 << 16  # entries sampled to bracket the rank
_MARGIN = 0.01  # rank fraction either side of the estimate kept inside the bracket


def kth_smallest(values: torch.Tensor, rank: int) -> float:
    """The value at 0-based ascending ``rank`` of ``values`` (any shape), exactly what
    ``values.flatten().kthvalue(rank + 1)`` gives, in a few element-wise passes.

    ``kthvalue`` selects over a copy of the whole tensor; here an evenly strided sample
    brackets the rank, two counts check that the bracket holds it, and the selection runs
    on the entries inside the bracket only (about 2% of them). A bracket that misses (a
    sample unlike the whole) falls back to ``kthvalue``, so the result never depends on the
    sample."""
    flat = values.reshape(-1)
    count = flat.numel()
    if not 0 <= rank < count:
        raise ValueError(f"rank {rank} is outside {count} values")
    if count <= 8 * _SAMPLE:
        return float(flat.kthvalue(rank + 1).values)
    sample = flat[:: count // _SAMPLE].sort().values
    position = rank / count * sample.numel()
    margin = _MARGIN * sample.numel()
    first, last = int(position - margin), int(position + margin) + 1
    low = sample[first] if first > 0 else flat.min()  # a rank near an end: bracket to it
    high = sample[last] if last < sample.numel() else flat.max()
    below = int(torch.count_nonzero(flat < low))
    bracket = (flat >= low) & (flat <= high)
    if not below <= rank < below + int(torch.count_nonzero(bracket)):
        return float(flat.kthvalue(rank + 1).values)
    return float(flat[bracket].kthvalue(rank - below + 1).values)
