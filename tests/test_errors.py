"""ckptavg.errors: the exceptions and the one check of integer settings every module uses."""

import doctest

import pytest

from ckptavg import errors
from ckptavg.errors import CkptavgWarning, CorruptSnapshotError, check_int


def test_doctests():
    assert doctest.testmod(errors).failed == 0


@pytest.mark.parametrize(
    "value, kwargs, message",
    [
        (0, {"minimum": 1}, "window must be a positive integer, got 0"),
        (True, {}, "window must be a non-negative integer, got True"),
        (2.0, {"minimum": 1}, "window must be a positive integer, got 2.0"),
        (-1, {}, "window must be a non-negative integer, got -1"),
        ("3", {"minimum": 1, "optional": True}, "window must be a positive integer or None, got '3'"),
        (4, {"minimum": 5}, "window must be an integer of at least 5, got 4"),
    ],
)
def test_bad_integers_are_value_errors_naming_the_setting(value, kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        check_int(value, "window", **kwargs)


def test_good_integers_pass_through():
    assert check_int(0, "step") == 0 and check_int(7, "window", minimum=1) == 7
    assert check_int(None, "every_n_steps", minimum=1, optional=True) is None


def test_the_error_types_keep_their_promises():
    assert issubclass(CkptavgWarning, UserWarning) and issubclass(CkptavgWarning, RuntimeWarning)
    error = CorruptSnapshotError("w/snapshot-1.safetensors", "truncated")
    assert isinstance(error, OSError) and isinstance(error, ValueError)
    assert str(error) == "snapshot file w/snapshot-1.safetensors is unusable: truncated"
    from ckptavg import files

    assert files.CkptavgWarning is CkptavgWarning  # the names' home before 0.2 still has them


def test_names_that_left_the_top_level_keep_working_with_a_deprecation_warning():
    import ckptavg
    from ckptavg import layout, methods

    for name, target in (("sma", methods.sma), ("Layout", layout.Layout), ("merge_method", methods.merge_method)):
        with pytest.warns(DeprecationWarning, match=f"ckptavg.{name} is deprecated"):
            assert getattr(ckptavg, name) is target
    with pytest.warns(DeprecationWarning, match="ckptavg.callback is deprecated"):
        import importlib
        import sys

        sys.modules.pop("ckptavg.callback", None)
        module = importlib.import_module("ckptavg.callback")
    assert module.CheckpointAverager is ckptavg.CheckpointAverager
    assert len(ckptavg.__all__) <= 22 and all(hasattr(ckptavg, name) for name in ckptavg.__all__)
