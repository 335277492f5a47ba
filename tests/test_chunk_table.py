"""The chunk table (csrc/chunk_table.h, NOTE [chunk table]) through fused_adam._C.chunk_table: metadata only."""
import pytest
from conftest import requires_native

pytestmark = requires_native


def table(numels, chunk_size):
    from fused_adam import _C

    return _C.chunk_table(numels, chunk_size)


def check_cover(numels, chunk_size, entries):
    """Entries are in tensor order, each 1..chunk_size long, and tile every tensor exactly once."""
    next_start = {}
    last_tensor = -1
    for t, start, size in entries:
        assert t >= last_tensor
        last_tensor = t
        assert 1 <= size <= chunk_size
        assert start == next_start.get(t, 0)
        next_start[t] = start + size
    for t, n in enumerate(numels):
        assert next_start.get(t, 0) == n


def test_small_cases():
    assert table([], 4) == []
    assert table([0, 0], 4) == []
    assert table([1], 4) == [(0, 0, 1)]
    assert table([4], 4) == [(0, 0, 4)]  # exact multiple: no empty tail chunk
    assert table([8], 4) == [(0, 0, 4), (0, 4, 4)]
    assert table([5, 0, 3], 4) == [(0, 0, 4), (0, 4, 1), (2, 0, 3)]


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 65536])
def test_boundaries(chunk_size):
    numels = [chunk_size - 1, chunk_size, chunk_size + 1, 2 * chunk_size, 2 * chunk_size + 1, 0, 7]
    entries = table(numels, chunk_size)
    check_cover(numels, chunk_size, entries)


@pytest.mark.parametrize("numel", [2**31 - 1, 2**31, 2**31 + 1, 2**33])
def test_tensors_past_int32(numel):
    """Offsets are int64: a 2^31-element tensor (and 2^33) ends where it should. No memory is allocated."""
    chunk_size = 2**26
    entries = table([3, numel, 5], chunk_size)
    check_cover([3, numel, 5], chunk_size, entries)
    big = [e for e in entries if e[0] == 1]
    assert len(big) == -(-numel // chunk_size)
    assert big[-1][1] + big[-1][2] == numel
    assert entries[-1] == (2, 0, 5)


def test_errors_name_the_value():
    with pytest.raises(ValueError, match="chunk_size must be positive, got 0"):
        table([4], 0)
    with pytest.raises(ValueError, match="tensor 1 has negative numel -2"):
        table([4, -2], 4)
