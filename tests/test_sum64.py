"""The journal's checksum (:mod:`monoquant.sum64`): the sums its docstring defines, computed
exactly (modulo 2^64) whatever the cutting of the stream, and the changes it must catch."""

from __future__ import annotations

import os
import random

import pytest

from monoquant import sum64
from monoquant.sum64 import MASK, Sum64


def reference(data: bytes) -> tuple[int, int]:
    """A = Σ w_i, B = Σ i·w_i (mod 2^64) over little-endian signed words, in plain Python."""
    padded = data + bytes(-len(data) % 8)
    a = b = 0
    for i in range(0, len(padded), 8):
        w = int.from_bytes(padded[i : i + 8], "little", signed=True)
        a += w
        b += (i // 8 + 1) * w
    return a & MASK, b & MASK


def summed(*pieces: bytes | bytearray | memoryview) -> Sum64:
    s = Sum64()
    for p in pieces:
        s.update(p)
    return s


WHOLE = 8 * sum64.MATRIX_WORDS  # bytes: the smallest update summed as a matrix


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 4096 + 3, WHOLE - 8, WHOLE, 3 * WHOLE + 45])
def test_sums_are_the_defined_ones(n: int) -> None:
    data = os.urandom(n)
    assert summed(data).pair() == reference(data)


def test_wraps_modulo_2_64_exactly() -> None:
    """Words near the top of the range: the sums overflow int64 many times over (in the rows of
    a matrix piece and in the words after them)."""
    data = b"\xff" * 7 + b"\x7f" + b"\x00" * 7 + b"\x80"  # int64 max, then int64 min
    data = data * 5000 + b"\xff" * 7 + b"\x7f" * 9  # 10002 words: 10000 in rows, 2 after them
    assert summed(data).pair() == reference(data)


def test_matrix_pieces_of_a_long_update_and_their_leftovers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long update in pieces just over MATRIX_WORDS words (rows and leftover words in each
    piece), words of extreme values among random ones."""
    rng = random.Random(3)
    words = [rng.choice([2**63 - 1, -(2**63), -1, rng.getrandbits(64) - 2**63]) for _ in range(40_000)]
    data = b"".join(w.to_bytes(8, "little", signed=True) for w in words) + b"\x01\x02\x03"
    monkeypatch.setattr(sum64, "PIECE_WORDS", sum64.MATRIX_WORDS + 3)
    assert summed(bytearray(data)).pair() == reference(data)
    assert summed(data[:5], data[5:70_001], data[70_001:]).pair() == reference(data)


def test_any_cutting_of_the_stream_gives_the_same_digest() -> None:
    rng = random.Random(7)
    data = os.urandom(200_003)
    want = summed(data).digest()
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 40)))
        pieces = [memoryview(data)[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        assert summed(*pieces).digest() == want


def test_long_updates_are_summed_in_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """An update longer than PIECE_WORDS words goes in several torch calls: the same sums."""
    data = os.urandom(8 * 1000 + 5)
    monkeypatch.setattr(sum64, "PIECE_WORDS", 7)
    assert summed(bytearray(data)).pair() == reference(data)


def test_read_only_and_writable_buffers_agree() -> None:
    data = os.urandom(1000)
    assert summed(data).digest() == summed(bytearray(data)).digest() == summed(memoryview(data)).digest()


def test_every_change_within_two_adjacent_words_is_caught() -> None:
    """Flipped bits anywhere, and random changes of any 16 bytes that span two words."""
    rng = random.Random(11)
    data = bytearray(os.urandom(4096))
    good = summed(data).digest()
    for pos in range(0, len(data), 61):
        for bit in (0, 7):
            changed = bytearray(data)
            changed[pos] ^= 1 << bit
            assert summed(changed).digest() != good, (pos, bit)
    for _ in range(500):
        pos = rng.randrange(0, len(data) - 16)
        changed = bytearray(data)
        changed[pos : pos + 16] = os.urandom(16)
        if changed != data:
            assert summed(changed).digest() != good, pos


def test_swaps_zeroed_ranges_and_padding_are_caught() -> None:
    data = bytearray(os.urandom(8 * 64))
    good = summed(data).digest()
    swapped = bytearray(data)
    swapped[0:8], swapped[80:88] = data[80:88], data[0:8]
    zeroed = bytearray(data)
    zeroed[100:300] = bytes(200)
    assert summed(swapped).digest() != good
    assert summed(zeroed).digest() != good
    # a trailing zero byte is padding to the sums: the size check (the planned size) catches it
    assert summed(data + b"\0").pair() == summed(data).pair()
