import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monoquant.packing import pack_dim0, pack_rows, packed_cols, unpack_dim0, unpack_rows


def test_documented_int4_example():
    q = torch.tensor([[-8, -7, -1, 0, 1, 2, 6, 7, 3, -3]])
    words = pack_rows(q, 4)
    assert words.dtype == torch.int32
    assert [w & 0xFFFFFFFF for w in words[0].tolist()] == [0xFEA98710, 0x0000005B]
    # little-endian bytes: two codes per byte, element 0 in the low nibble
    assert words.view(torch.uint8)[0].tolist() == [0x10, 0x87, 0xA9, 0xFE, 0x5B, 0, 0, 0]


def test_documented_int8_example():
    words = pack_rows(torch.tensor([[-128, -1, 0, 127, 5]]), 8)
    assert [w & 0xFFFFFFFF for w in words[0].tolist()] == [0xFF807F00, 0x00000085]


def test_offset_binary_not_twos_complement():
    # q = -1 must become nibble 7 (0b0111), not 15 (two's complement)
    assert pack_rows(torch.tensor([[-1]]), 4).item() == 7


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9), cols=st.integers(1, 70), bits=st.sampled_from([4, 8]), seed=st.integers(0, 2**16)
)
def test_pack_unpack_identity(rows, cols, bits, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    q = torch.randint(lo, hi, (rows, cols), generator=g, dtype=torch.int8)
    p = pack_rows(q, bits)
    assert tuple(p.shape) == (rows, packed_cols(cols, bits))
    assert torch.equal(unpack_rows(p, bits, cols), q)
    z = pack_dim0(q, bits)
    assert tuple(z.shape) == (packed_cols(rows, bits), cols)
    assert torch.equal(unpack_dim0(z, bits, rows), q)


def test_padding_nibbles_are_zero():
    p = pack_rows(torch.tensor([[7, 7, 7]]), 4)
    assert p.item() & 0xFFFFFFFF == 0x00000FFF
