"""Exact and near duplicates among millions of rows, in memory that holds no text.

Exact duplicates share a content hash; 8 bytes of it per row are kept and sorted once.

Near duplicates are pairs whose normalised texts (`text.normalise_for_dedup`: case-folded,
punctuation and spacing removed) have a Jaccard similarity of at least THRESHOLD over their sets of character
5-grams: one changed word in a sentence of twenty still counts, a different sentence on the
same pattern does not. The similarity is estimated with MinHash (PERMUTATIONS hash functions,
16 bits kept of each, 128 bytes per row) and candidate pairs come from LSH banding (bands of
BAND_ROWS values): pairs at 0.8 share a band with probability above 0.9999, so the search is
one hash table per band instead of comparing every pair. Candidates are then confirmed on
their whole signatures. Both steps are estimates: a pair near the threshold can fall on either
side of it (the estimate's standard error is about 0.05).

The signatures are computed with numpy over batches of rows: a Python loop over the 5-grams
of a million rows would take tens of minutes. (datasketch offers the same method, one Python
object per row and an index of Python dicts, which is what this module avoids at this scale.)
"""

from __future__ import annotations

import numpy as np

from tunelab.text import normalise_for_dedup

THRESHOLD = 0.8
"""Estimated Jaccard similarity of character 5-grams at or above which two rows are near duplicates."""
SHINGLE = 5
PERMUTATIONS = 64
BAND_ROWS = 4
_BANDS = PERMUTATIONS // BAND_ROWS
_LEAST_EQUAL = next(n for n in range(PERMUTATIONS + 1) if n / PERMUTATIONS >= THRESHOLD)
"""Equal values of two signatures at the least for a near-duplicate pair (52 of 64)."""
_LEAST_EQUAL_BANDS = _BANDS - (PERMUTATIONS - _LEAST_EQUAL)
"""Equal bands at the least for such a pair (4 of 16): each unequal value makes at most one band unequal."""
_BATCH_BYTES = 1 << 18
"""Text per batch of signatures: its 5-grams' hashes (8 bytes each) stay in a core's L2 cache
through the 64 passes, ~20% less time than batches of 1 MiB."""
_ASCII_WORDS = bytes(c if chr(c).isalnum() or c == ord("_") else ord(" ") for c in range(128)).lower() + b" " * 128
"""A byte translation table: each ASCII byte that is part of a word (`\\w`) lower-cased, a space for any other."""
_VERIFY_CHUNK = 1 << 14
"""Candidate pairs confirmed at a time: their signatures (2 MiB a side) stay in a core's cache,
and each thread's temporary arrays stay small (chunks of 128 Ki pairs took a third more time and
~90 MiB more memory with two threads, on a million rows)."""


class NearDuplicates:
    """Add texts in order, then ask for the near-duplicate pairs among them (by index)."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        # Multiply-shift hashing: odd 64-bit multipliers, the top 32 bits of the product.
        self._multipliers = rng.integers(1, 2**63, PERMUTATIONS, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._offsets = rng.integers(0, 2**63, PERMUTATIONS, dtype=np.uint64)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._signatures: list[np.ndarray] = []
        self.count = 0

    def add(self, text: str) -> None:
        data = normalised_bytes(text)
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.count += 1
        if self._pending_bytes >= _BATCH_BYTES:
            self._flush()

    def extend(self, other: NearDuplicates) -> None:
        """Add the texts `other` was given, after these (both made with the same seed)."""
        self._flush()
        self._signatures.append(other.signatures())
        self.count += other.count

    def signatures(self) -> np.ndarray:
        """(rows, PERMUTATIONS) uint16 MinHash signatures of everything added."""
        self._flush()
        if len(self._signatures) != 1:
            # Batch by batch into one array, each batch freed once copied: never two copies of all.
            joined = np.empty((sum(map(len, self._signatures)), PERMUTATIONS), np.uint16)
            position = 0
            self._signatures.reverse()
            while self._signatures:
                batch = self._signatures.pop()
                joined[position : position + len(batch)] = batch
                position += len(batch)
            self._signatures = [joined]
        return self._signatures[0]

    def pairs(self, skip: np.ndarray | None = None, threads: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Near-duplicate pairs (first index, later index, estimated similarity), sorted;
        rows where `skip` is true (e.g. exact copies) take no part. The bands are searched by
        `threads` threads: pyarrow's hashing and numpy's copies and comparisons let go of the GIL,
        and the pairs found are the same whatever the threads (each band's on its own, sorted
        together at the end)."""
        signatures = self.signatures()
        index = np.arange(len(signatures)) if skip is None else np.flatnonzero(~skip)
        if threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(threads) as pool:
                found = list(pool.map(lambda band: _band_pairs(signatures, index, band), range(_BANDS)))
        else:
            found = [_band_pairs(signatures, index, band) for band in range(_BANDS)]
        pair_ids = np.unique(np.concatenate(found))
        first, later = pair_ids // len(signatures), pair_ids % len(signatures)
        return first, later, _similarity(signatures, first, later)

    def _flush(self) -> None:
        if self._pending:
            self._signatures.append(self._minhash(self._pending))
            self._pending, self._pending_bytes = [], 0

    def _minhash(self, docs: list[bytes]) -> np.ndarray:
        # A text shorter than one 5-gram is padded to one, so it still has a signature.
        docs = [d if len(d) >= SHINGLE else d.ljust(SHINGLE, b"\0") for d in docs]
        lengths = np.fromiter(map(len, docs), np.int64, len(docs))
        joined = b"".join(docs)
        n = len(joined) - SHINGLE + 1
        # Each 5-gram is its own number (5 bytes fit in 40 bits, the first byte lowest): the
        # 8 bytes from each position read as one little-endian integer, cut to 40 bits.
        data = np.frombuffer(joined + bytes(8 - SHINGLE), np.uint8)
        windows = np.ndarray((n,), "<u8", data, strides=(1,))
        grams = windows & np.uint64((1 << (8 * SHINGLE)) - 1)
        counts = lengths - SHINGLE + 1
        starts = np.cumsum(lengths) - lengths
        firsts = np.cumsum(counts) - counts
        # Keep only the 5-grams inside one document (not across the join of two).
        grams = grams[np.repeat(starts - firsts, counts) + np.arange(counts.sum())]
        signature = np.empty((len(docs), PERMUTATIONS), np.uint16)
        hashed = np.empty_like(grams)
        for p in range(PERMUTATIONS):
            # Multiply-shift: the top 32 bits of a * gram + b. The minimum is taken before the
            # shift (the shift keeps the order), which saves a pass over every 5-gram.
            np.multiply(grams, self._multipliers[p], out=hashed)
            np.add(hashed, self._offsets[p], out=hashed)
            signature[:, p] = (np.minimum.reduceat(hashed, firsts) >> np.uint64(32)).astype(np.uint16)
        return signature


def _band_pairs(signatures: np.ndarray, index: np.ndarray, band: int) -> np.ndarray:
    """The near-duplicate pairs among the rows of `index` that share `band`, as ids (first row
    times the rows, plus the later row)."""
    bands = signatures.view(np.uint64)  # BAND_ROWS values of 16 bits are one 64-bit key: equal keys, equal band
    # Each row is compared with the first row of its bucket (of equal keys), not with every
    # other row: linear in the rows however large a bucket of look-alike rows grows.
    firsts = first_equal(bands[index, band])
    later = np.flatnonzero(firsts != np.arange(len(firsts)))
    first, later = index[firsts[later]], index[later]
    found = []
    for lo in range(0, len(first), _VERIFY_CHUNK):
        a, b = first[lo : lo + _VERIFY_CHUNK], later[lo : lo + _VERIFY_CHUNK]
        # Templated rows fill buckets with pairs that share a band and little more (24 of
        # 25 candidates on the benchmark's bookings): whole bands compared first, 16
        # numbers instead of 64, rule them out (~30% less time for this step).
        close = np.count_nonzero(_rows(bands, a) == _rows(bands, b), axis=1) >= _LEAST_EQUAL_BANDS
        a, b = a[close], b[close]
        similar = _similarity(signatures, a, b) >= THRESHOLD
        found.append(a[similar] * len(signatures) + b[similar])
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def normalised_bytes(text: str) -> bytes:
    """`normalise_for_dedup(text)` as UTF-8, byte for byte. An ASCII text (most rows) takes a
    shortcut through byte translation and split, ~2.5x faster than the regular expression and
    worth ~10% of the whole check: on ASCII, case folding is lower-casing and `\\w` is [A-Za-z0-9_]."""
    if text.isascii():
        return b" ".join(text.encode().translate(_ASCII_WORDS).split())
    return normalise_for_dedup(text).encode()


def _similarity(signatures: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (_rows(signatures, a) == _rows(signatures, b)).mean(axis=1)


def _rows(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`matrix[rows]`, ~10x faster: numpy's `take` copies each row whole, where indexing goes
    element by element (a million rows' candidates: ~1.5 s of the near-duplicate search)."""
    return np.take(matrix, rows, axis=0)


def exact_duplicates(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the first occurrence, index of a later copy) for every repeated key, in the
    order of the copies. Sorted, not hashed: nearly every key is distinct, and a hash table of a
    million of them would cost ~70 MiB to save a tenth of a second."""
    firsts = _first_equal_sorted(keys)
    copy = np.flatnonzero(firsts != np.arange(len(keys)))
    return firsts[copy], copy


HASHED_FROM = 1 << 16
"""Keys from which `first_equal` hashes them (and novelty.py looks values up) with pyarrow:
below, a sort takes no longer than pyarrow's import (~0.15 s, ~45 MiB), which is not paid."""


def first_equal(keys: np.ndarray) -> np.ndarray:
    """For each of the 64-bit `keys`, the index of the first key equal to it (its own index when
    it comes first). Many keys are hashed: pyarrow's dictionary encoding numbers the distinct keys
    in the order they first occur, with a hash table, several times faster than a sort."""
    if len(keys) < HASHED_FROM:
        return _first_equal_sorted(keys)
    import pyarrow as pa

    number = pa.array(keys).dictionary_encode().indices.to_numpy()
    highest = np.maximum.accumulate(number)
    opens = np.ones(len(number), bool)  # where a key first occurs: the numbers reach a new high
    opens[1:] = highest[1:] > highest[:-1]
    return np.flatnonzero(opens)[number]


def _first_equal_sorted(keys: np.ndarray) -> np.ndarray:
    """`first_equal` by a stable sort: equal keys side by side, the first of them first."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.ones(len(order), bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    firsts = np.empty(len(order), np.int64)
    firsts[order] = order[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))]
    return firsts


def components(n: int, first: np.ndarray, later: np.ndarray) -> np.ndarray:
    """For each of n rows, the smallest row index connected to it through the pairs."""
    label = np.arange(n)
    while True:
        previous = label.copy()
        np.minimum.at(label, later, label[first])
        np.minimum.at(label, first, label[later])
        label = label[label]  # pointer jumping: follow each label to its own label
        if np.array_equal(label, previous):
            return label
