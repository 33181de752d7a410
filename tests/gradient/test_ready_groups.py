"""``offload.ReadyGroups``: which quantization groups of a partition may cross to the host while the
boundary backward still runs. Checked against a brute-force model: a group is due once all of its
elements were written, and again after a later write touches it."""

from __future__ import annotations

import random

from agoq_ds.gradient.offload import ReadyGroups


def _expand(ranges: list[tuple[int, int]]) -> list[int]:
    return [g for lo, hi in ranges for g in range(lo, hi)]


def test_groups_are_sent_once_all_their_elements_are_final_and_again_after_a_rewrite() -> None:
    rng = random.Random(0)
    for _ in range(200):
        numel, group = rng.randint(1, 300), rng.choice([1, 4, 16, 128])
        ready = ReadyGroups(numel, group)
        groups = ready.groups
        written = [False] * numel
        sent_count = [0] * groups
        due_after_write = [False] * groups  # touched since last sent
        for _ in range(rng.randint(1, 8)):
            off = rng.randrange(numel)
            n = rng.randint(0, numel - off)
            touched = set(range(off // group, -(-(off + n) // group))) if n else set()
            for g in touched:
                due_after_write[g] = True
            for i in range(off, off + n):
                written[i] = True
            sent = _expand(ready.write([(off, n)]))
            assert len(sent) == len(set(sent))
            for g in range(groups):
                complete = all(written[g * group : min((g + 1) * group, numel)])
                if g in sent:
                    assert complete and due_after_write[g], (g, numel, group)
                    due_after_write[g] = False
                    sent_count[g] += 1
                else:  # not sent now: incomplete, or already sent and untouched since
                    assert not (complete and due_after_write[g]), (g, numel, group)
        rest = _expand(ready.remaining())
        for g in range(groups):
            # What the epilogue still sends: exactly the groups never sent or touched since.
            assert (g in rest) == (sent_count[g] == 0 or due_after_write[g]), (g, numel, group)


def test_reverse_order_buckets_with_a_straddling_group() -> None:
    ready = ReadyGroups(10, 4)  # groups [0,4) [4,8) [8,10)
    assert ready.write([(6, 4)]) == [(2, 3)]  # elements 6..9: only the last (short) group is whole
    assert ready.write([(3, 3)]) == [(1, 2)]  # 3..5 completes group 1 (4..7), group 0 still lacks 0..2
    assert ready.remaining() == [(0, 1)]
    assert ready.write([(0, 3)]) == [(0, 1)]
    assert ready.remaining() == []
    assert ready.write([(5, 1)]) == [(1, 2)]  # a second backward rewrites element 5: group 1 is due again
