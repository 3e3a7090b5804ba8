"""Devices: the accelerator by default when there is one; one that is not there is a clear error."""

from __future__ import annotations

import pytest
import torch

from visor.device import check_device, default_device


def test_the_default_is_the_accelerator_when_there_is_one():
    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    assert check_device(default_device()).type == default_device()


@pytest.mark.parametrize("name, message", [("cuda:7" if torch.cuda.device_count() < 8 else "cuda:64", "is not there"),
                                           ("gpu", "unknown device")])
def test_a_device_that_is_not_there_is_named(name, message):
    with pytest.raises(ValueError, match=message):
        check_device(name)
