"""How packed perturbation batches are laid out, and what a batch costs against the token budget.

Causal-LM suffixes (and whole texts) are packed end to end. Two layouts, each used both by the forward
that runs it and by the scheduler's `batch_cost`:
- `RowLayout` (`forward.packed_suffix_forward`, dense attention with a 4-D mask): rows of suffixes,
  each row carrying the cached prefixes of the texts it serves; a batch costs the padded key columns
  it holds, rows x (prefix columns + query columns);
- `CascadeLayout` (`cascade.cascade_forward`, cascade attention): one row of every suffix, the
  prefixes read once; a batch costs its query tokens plus the prefix positions they read.
"""

from __future__ import annotations

from dataclasses import dataclass

from .types import FullPayload, SuffixPayload, WorkItem


@dataclass(frozen=True)
class Suffix:
    text: int  # which clean cache (index into the `caches` list passed with it)
    start: int  # first changed position s: positions < s come from the cache
    ids: tuple[int, ...]  # the perturbed tokens from position s to the end


def pack_rows(lengths: list[int], texts: list[int], prefix_lengths: list[int], capacity: int) -> list[list[int]]:
    """Pack suffixes into rows: item indices per row.

    First-fit over items taken text by text, longest first. A row holds at most `capacity` suffix
    tokens (or one longer suffix) and the cached prefixes of at most `capacity` tokens of the texts
    it serves (or one text's), so each row attends to its own texts' prefixes only, not to every
    text of the batch. `prefix_lengths[i]` is the cached length item i needs (0 for none).

    Rows are padded to the longest, so their lengths are then evened out: the same first fit is
    retried with a smaller query capacity, down towards total / rows, and the tightest packing that
    needs no more rows wins (five rows of 256 + 256 + 256 + 256 + 80 become five of ~221).
    Without prefixes (whole texts: the clean pass, the attention methods) the rows are balanced
    directly: ceil(total / capacity) rows, each item to the least-filled row, longest first; a row
    then exceeds `capacity` by less than one item.
    """
    if not any(prefix_lengths):
        n_rows = max(1, -(-sum(lengths) // capacity))
        balanced: list[list[int]] = [[] for _ in range(n_rows)]
        loads = [0] * n_rows
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            r = loads.index(min(loads))
            balanced[r].append(i)
            loads[r] += lengths[i]
        return [row for row in balanced if row]
    best = _first_fit(lengths, texts, prefix_lengths, capacity, capacity)
    width = max(sum(lengths[i] for i in row) for row in best)
    floor = max(-(-sum(lengths) // len(best)), max(lengths))
    step = max(1, (width - floor) // 8)
    for query_capacity in range(floor, width, step):
        rows = _first_fit(lengths, texts, prefix_lengths, query_capacity, capacity)
        if len(rows) <= len(best):
            return rows
    return best


def _first_fit(lengths, texts, prefix_lengths, capacity: int, prefix_capacity: int) -> list[list[int]]:
    rows: list[list[int]] = []
    room: list[int] = []
    prefix_room: list[int] = []
    row_texts: list[set[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (texts[i], -lengths[i])):
        need = prefix_lengths[i]
        for r in range(len(rows)):
            new_text = need > 0 and texts[i] not in row_texts[r]
            if lengths[i] <= room[r] and (not new_text or need <= prefix_room[r]):
                rows[r].append(i)
                room[r] -= lengths[i]
                if new_text:
                    row_texts[r].add(texts[i])
                    prefix_room[r] -= need
                break
        else:
            rows.append([i])
            room.append(max(capacity, lengths[i]) - lengths[i])
            row_texts.append({texts[i]} if need else set())
            prefix_room.append(max(prefix_capacity, need) - need)
    return rows


@dataclass
class RowLayout:
    """How `packed_suffix_forward` lays suffixes out: rows of [cached prefixes | suffixes end to end]."""

    rows: list[list[int]]  # suffix indices per row
    prefix_offsets: list[dict[int, int]]  # per row: text -> first column of its cached prefix
    prefix_width: int  # prefix columns (the widest row's cached prefixes)
    query_width: int  # query columns (the widest row's suffixes)

    @classmethod
    def of(cls, suffixes: list[Suffix], cached: list[int], capacity: int) -> RowLayout:
        """`cached[t]`: the cached length of text t (a suffix starting at 0 reads no cache)."""
        lengths = [len(s.ids) for s in suffixes]
        needs = [cached[s.text] if s.start > 0 else 0 for s in suffixes]
        rows = pack_rows(lengths, [s.text for s in suffixes], needs, capacity)
        offsets = []
        for row in rows:
            row_offsets, at = {}, 0
            for i in row:
                t = suffixes[i].text
                if needs[i] and t not in row_offsets:
                    row_offsets[t] = at
                    at += cached[t]
            offsets.append(row_offsets)
        prefix_width = max((sum(cached[t] for t in offs) for offs in offsets), default=0)
        query_width = max(sum(lengths[i] for i in row) for row in rows)
        return cls(rows, offsets, prefix_width, query_width)

    @property
    def padded_tokens(self) -> int:
        """Key columns the batch holds per layer: what the token budget bounds."""
        return len(self.rows) * (self.prefix_width + self.query_width)


@dataclass
class CascadeLayout:
    """How `cascade.cascade_forward` lays suffixes out: every suffix's tokens end to end in one packed
    row, grouped by the text whose prefix they extend, and the prefixes they read concatenated once
    for the whole batch (`kernels.cascade_attention`: no copy per row, no padding)."""

    order: list[int]  # suffix indices in row order (a text's suffixes adjacent)
    columns: list[int]  # per suffix index: the row column of its first token
    prefix_offsets: dict[int, int]  # text -> its first column among the concatenated prefixes
    prefix_lengths: dict[int, int]  # text -> cached positions read: the largest start of its suffixes
    query_tokens: int  # the row's length

    @classmethod
    def of(cls, suffixes: list[Suffix]) -> CascadeLayout:
        order = sorted(range(len(suffixes)), key=lambda i: suffixes[i].text)  # stable: submission order within
        columns = [0] * len(suffixes)
        lengths: dict[int, int] = {}
        at = 0
        for i in order:
            s = suffixes[i]
            columns[i] = at
            at += len(s.ids)
            if s.start:
                lengths[s.text] = max(lengths.get(s.text, 0), s.start)
        offsets, offset = {}, 0
        for t, n in lengths.items():
            offsets[t] = offset
            offset += n
        return cls(order, columns, offsets, lengths, at)

    @property
    def padded_tokens(self) -> int:
        """Tokens the batch holds per layer: its queries and the prefix positions they read."""
        return self.query_tokens + sum(self.prefix_lengths.values())


def suffixes_over_caches(payloads: list[SuffixPayload]) -> tuple[list[tuple[int, ...]], list[Suffix]]:
    """The batch's distinct clean texts (prefix-cache keys) in first-seen order, and each payload as a
    `Suffix` over the cache slot of its text in that order."""
    keys = list(dict.fromkeys(p.prefix for p in payloads))
    slot = {key: i for i, key in enumerate(keys)}
    return keys, [Suffix(slot[p.prefix], p.start, p.ids) for p in payloads]


def whole_texts(payloads: list[FullPayload]) -> list[Suffix]:
    """Whole sequences as suffixes that start at 0 and read no cache (the packed clean pass)."""
    return [Suffix(0, 0, p.ids) for p in payloads]


def batch_cost(group, items: list[WorkItem], row_capacity: int, cascade: bool = False) -> int:
    """Padded tokens of a batch as it will be laid out: packed rows hold their texts' cached prefixes
    and their suffixes end to end; with `cascade`, one row holds every suffix and the prefixes they
    read once; other kinds stack equal lengths (or price their own items), so they cost their tokens."""
    payloads = [item.payload for item in items]
    if group[0] == "suffix":
        keys, suffixes = suffixes_over_caches(payloads)
        if cascade:
            return CascadeLayout.of(suffixes).padded_tokens
        return RowLayout.of(suffixes, [len(key) for key in keys], row_capacity).padded_tokens
    if group[0] == "packed" and not cascade:
        return RowLayout.of(whole_texts(payloads), [], row_capacity).padded_tokens
    return sum(item.tokens for item in items)
