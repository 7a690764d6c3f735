"""The bound launch's argument builder: every parameter in kernel order, the dynamic ones converted
(tensor -> address, tuple of tensors -> addresses, int as is) in whatever order `bind` named them."""

from __future__ import annotations

import pytest
import torch

from a2a.ops.launch import _AS_ADDRESS, _AS_ADDRESSES, _AS_IS, _argument_builder


def test_arguments_put_each_dynamic_value_at_its_position():
    fixed = list(range(100, 110))
    first, second = torch.zeros(2), torch.zeros(3)
    build = _argument_builder(fixed, (7, 0, 3, 9), (_AS_IS, _AS_ADDRESS, _AS_ADDRESSES, _AS_IS))
    want = list(fixed)
    want[7], want[0], want[3], want[9] = 70, first.data_ptr(), (first.data_ptr(), second.data_ptr()), -5
    assert build(70, first, (first, second), -5) == tuple(want)
    assert build(71, second, (), 0)[:4] == (second.data_ptr(), 101, 102, ())  # fresh values each call


def test_arguments_without_dynamic_values_are_the_fixed_ones():
    assert _argument_builder([1, None, 3], (), ())() == (1, None, 3)


def test_an_extra_argument_cannot_replace_the_fixed_ones():
    build = _argument_builder([1, 2, 3], (1,), (_AS_IS,))
    with pytest.raises(TypeError):
        build(5, (9,))
