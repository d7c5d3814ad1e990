"""The scheduler alone, with a fake runner that returns deterministic outputs (no torch)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from engine.runtime.scheduler import Scheduler, WorkItem


def _random_requests(rng: random.Random, n_requests: int):
    requests = {}
    for r in range(n_requests):
        n_items = rng.randint(1, 12)
        group = rng.choice(["suffix", ("full", 5), ("full", 9), ("ig", 7)])
        requests[f"req{r}"] = [
            WorkItem(f"req{r}", i, group, rng.randint(1, 40), payload=(r, i)) for i in range(n_items)
        ]
    return requests


def _fake_run(batch):
    # a deterministic function of the payload, so a misrouted output is detected
    return [p[0] * 1000 + p[1] for p in (item.payload for item in batch.items)]


def _drain(scheduler):
    batches, finished = [], {}
    while (batch := scheduler.schedule()) is not None:
        batches.append(batch)
        for request, outputs in scheduler.complete(batch, _fake_run(batch)):
            assert request not in finished, "a request finished twice"
            finished[request] = outputs
    return batches, finished


@pytest.mark.parametrize("max_tokens,max_size", [(1, None), (3, 3), (7, 7), (40, 1), (64, 5), (10_000, None)])
@pytest.mark.parametrize("seed", range(5))
def test_every_item_once_within_budget_and_scattered_back(max_tokens, max_size, seed):
    rng = random.Random(seed)
    requests = _random_requests(rng, 15)
    scheduler = Scheduler(max_tokens, max_size)
    order = list(requests)
    rng.shuffle(order)
    for name in order:
        items = requests[name][:]
        rng.shuffle(items)  # items may arrive in any order; outputs come back in index order
        scheduler.add(name, items)
    batches, finished = _drain(scheduler)

    seen = [(item.request, item.index) for b in batches for item in b.items]
    assert sorted(seen) == sorted((r, i.index) for r, items in requests.items() for i in items)
    assert len(seen) == len(set(seen))
    for b in batches:
        assert len({item.group for item in b.items}) == 1 and b.group == b.items[0].group
        assert b.tokens == sum(item.tokens for item in b.items)
        assert b.tokens <= max_tokens or len(b.items) == 1  # only a lone oversize item may exceed
        assert max_size is None or len(b.items) <= max_size
    assert set(finished) == set(requests)
    for name, items in requests.items():
        r = int(name[3:])
        assert finished[name] == [r * 1000 + i for i in range(len(items))]
    assert scheduler.pending_requests() == 0 and not scheduler.has_work()


def test_results_do_not_depend_on_submission_order():
    rng = random.Random(7)
    requests = _random_requests(rng, 20)
    outcomes = []
    for seed in range(3):
        order = list(requests)
        random.Random(seed).shuffle(order)
        scheduler = Scheduler(50, 6)
        for name in order:
            scheduler.add(name, requests[name])
        outcomes.append(_drain(scheduler)[1])
    assert outcomes[0] == outcomes[1] == outcomes[2]


def test_batches_are_full_and_follow_submission_order():
    scheduler = Scheduler(max_batch_tokens=10)
    scheduler.add("a", [WorkItem("a", i, "g", 3, (0, i)) for i in range(4)])
    scheduler.add("b", [WorkItem("b", i, "g", 3, (1, i)) for i in range(2)])
    batches, _ = _drain(scheduler)
    assert [[(i.request, i.index) for i in b.items] for b in batches] == [
        [("a", 0), ("a", 1), ("a", 2)],
        [("a", 3), ("b", 0), ("b", 1)],
    ]


def _padded_cost(group, items):
    # a non-additive cost, like a runner's padded layout: items stacked to the longest, plus 10
    return len(items) * max(item.tokens for item in items) + 10


@pytest.mark.parametrize("max_tokens,max_size", [(1, None), (25, 3), (64, None), (200, 7)])
def test_a_runner_cost_bounds_every_batch(max_tokens, max_size):
    rng = random.Random(max_tokens)
    requests = _random_requests(rng, 12)
    scheduler = Scheduler(max_tokens, max_size, batch_cost=_padded_cost)
    for name, items in requests.items():
        scheduler.add(name, items)
    batches, finished = _drain(scheduler)
    seen = sorted((item.request, item.index) for b in batches for item in b.items)
    assert seen == sorted((r, i.index) for r, items in requests.items() for i in items)
    for b in batches:
        assert b.tokens == _padded_cost(b.group, b.items)
        assert b.tokens <= max_tokens or len(b.items) == 1
        assert max_size is None or len(b.items) <= max_size
    assert set(finished) == set(requests)
    # batches are as large as the budget allows: one more item of the group would not have fit
    scheduler = Scheduler(60, batch_cost=_padded_cost)
    scheduler.add("a", [WorkItem("a", i, "g", 10, (0, i)) for i in range(12)])
    assert [len(b.items) for b in _drain(scheduler)[0]] == [5, 5, 2]  # 5 x 10 + 10 = 60


def test_oversize_item_runs_alone():
    scheduler = Scheduler(max_batch_tokens=5)
    scheduler.add("a", [WorkItem("a", i, "g", cost, (0, i)) for i, cost in enumerate([2, 9, 2])])
    batches, finished = _drain(scheduler)
    assert [len(b.items) for b in batches] == [1, 1, 1]
    assert finished["a"] == [0, 1, 2]


def test_bad_use_is_rejected():
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Scheduler(0)
    with pytest.raises(ValueError, match="max_batch_size"):
        Scheduler(10, 0)
    scheduler = Scheduler(10)
    scheduler.add("a", [WorkItem("a", 0, "g", 1)])
    with pytest.raises(ValueError, match="already added"):
        scheduler.add("a", [WorkItem("a", 0, "g", 1)])
    with pytest.raises(ValueError, match="indices"):
        scheduler.add("b", [WorkItem("b", 1, "g", 1)])
    batch = scheduler.schedule()
    with pytest.raises(ValueError, match="outputs"):
        scheduler.complete(batch, [])


def test_pack_rows_balances_whole_texts_and_respects_prefix_rooms():
    from engine.runtime.layout import pack_rows

    lengths = [17, 20, 9, 30, 25, 18, 21, 40, 12, 15, 33, 28, 19, 22, 11]
    rows = pack_rows(lengths, list(range(len(lengths))), [0] * len(lengths), capacity=100)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each item once
    loads = [sum(lengths[i] for i in row) for row in rows]
    assert len(rows) == -(-sum(lengths) // 100) and max(loads) - min(loads) <= max(lengths)
    # with prefixes: first fit, each row under capacity (or one longer item), prefixes within their room
    needs = [5] * len(lengths)
    rows = pack_rows(lengths, [i % 4 for i in range(len(lengths))], needs, capacity=60)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    for row in rows:
        assert sum(lengths[i] for i in row) <= 60 or len(row) == 1
    # the rows are evened out: no more rows than plain first fit, and no wider
    from engine.runtime.layout import _first_fit

    plain = _first_fit(lengths, [i % 4 for i in range(len(lengths))], needs, 60, 60)
    assert len(rows) <= len(plain)
    width = max(sum(lengths[i] for i in row) for row in rows)
    assert width <= max(sum(lengths[i] for i in row) for row in plain)


def test_abort_takes_out_one_requests_queued_items():
    scheduler = Scheduler(10)
    scheduler.add("a", [WorkItem("a", i, "g", 3, payload=(0, i)) for i in range(4)])
    scheduler.add("b", [WorkItem("b", i, "g", 3, payload=(1, i)) for i in range(2)])
    first = scheduler.schedule()  # a0, a1, a2 (9 tokens)
    removed = scheduler.abort("a")
    assert sorted(item.index for item in removed) == [3]  # the queued one; a0-a2 are in the running batch
    assert scheduler.complete(first, [0, 1, 2]) == []  # outputs of an aborted request are dropped
    batches, finished = _drain(scheduler)
    assert [item.request for b in batches for item in b.items] == ["b", "b"]
    assert finished == {"b": [1000, 1001]}
    assert scheduler.pending_requests() == 0 and scheduler.abort("a") == [] and scheduler.abort("zzz") == []


@pytest.mark.parametrize("share", [None, 0.5, 0.25])
def test_a_large_request_leaves_room_for_small_ones(share):
    scheduler = Scheduler(100, max_request_share=share)
    scheduler.add("big", [WorkItem("big", i, "g", 10, payload=(0, i)) for i in range(50)])
    scheduler.add("small", [WorkItem("small", i, "g", 10, payload=(1, i)) for i in range(3)])
    first = scheduler.schedule()
    by_request = Counter(item.request for item in first.items)
    if share is None:  # strict submission order: the small request waits for all of the big one
        assert by_request == {"big": 10}
    else:  # each request at most its share while the other waits: the small one starts at once
        cap = int(share * 100) // 10
        assert by_request == {"big": cap, "small": min(3, cap)}
    assert first.tokens <= 100
    batches, _ = _drain(scheduler)
    assert sum(len(b.items) for b in batches) + len(first.items) == 53  # nothing lost or repeated


def test_owners_share_one_cap():
    scheduler = Scheduler(100, max_request_share=0.5)
    for r in range(5):  # one caller's five requests count as one owner
        scheduler.add(f"c{r}", [WorkItem(f"c{r}", i, "g", 10, payload=(r, i)) for i in range(4)], owner="caller")
    scheduler.add("other", [WorkItem("other", i, "g", 10, payload=(9, i)) for i in range(4)])
    first = scheduler.schedule()
    owners = Counter("caller" if item.request.startswith("c") else "other" for item in first.items)
    assert owners == {"caller": 5, "other": 4}
