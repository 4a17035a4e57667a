"""The QK fix's check that a kept weight product is still current (``qk_fix._equal``): bitwise
equality, as 64-bit words where both tensors are contiguous, else ``torch.equal``."""

from __future__ import annotations

import pytest
import torch

from circuitfind.patching.qk_fix import _equal


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_equal_sees_one_changed_element_and_agrees_with_torch_equal(dtype):
    a = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)).to(dtype)
    b = a.clone()
    assert _equal(a, b)
    word = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    b.view(word)[17, 41] ^= 1  # the smallest change: the lowest bit of one element
    assert not torch.equal(a, b)
    assert not _equal(a, b)


def test_equal_on_strided_and_odd_sized_tensors_falls_back_to_torch_equal():
    a = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    strided = a.T  # not contiguous
    assert _equal(strided, strided.clone(memory_format=torch.preserve_format))
    assert not _equal(strided, strided + 1)
    odd = torch.randn(3)  # 12 bytes: not whole 64-bit words
    assert _equal(odd, odd.clone())
    assert not _equal(odd, odd * 2)


def test_equal_is_bitwise_so_a_signed_zero_counts_as_a_change():
    """``-0.0 == 0.0`` as values, but a product kept from ``-0.0`` is recomputed (at worst one
    product more), never reused for different bits."""
    a = torch.zeros(4)
    assert not _equal(a, -a)
