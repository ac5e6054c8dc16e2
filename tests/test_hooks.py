"""The run's hook points (`dopd_vlm.hooks`): what fault-injection tests rely on, checked alone."""

import pytest

from dopd_vlm import hooks


def test_hooks_run_in_order_only_inside_their_block():
    calls = []
    with hooks.registered("before_step", lambda step: calls.append(("a", step))):
        with hooks.registered("before_step", lambda step: calls.append(("b", step))):
            hooks.run("before_step", 3)
        hooks.run("before_step", 4)
    hooks.run("before_step", 5)
    assert calls == [("a", 3), ("b", 3), ("a", 4)]


def test_after_loss_hooks_chain_their_replacements_and_an_exception_unregisters():
    assert hooks.loss_after_hooks(2.0, None) == 2.0
    with hooks.registered("after_loss", lambda loss, hidden: loss * 3), \
            hooks.registered("after_loss", lambda loss, hidden: loss + 1):
        assert hooks.loss_after_hooks(2.0, None) == 7.0
    writes = []
    with pytest.raises(OSError), hooks.registered("after_write", lambda kind, path: writes.append(kind)):
        hooks.run("after_write", "metrics", "m.jsonl")
        raise OSError("a failing run")
    hooks.run("after_write", "pointer", "latest_complete")
    assert writes == ["metrics"]


def test_an_unknown_point_is_refused():
    with pytest.raises(ValueError, match="unknown hook point 'before_stpe'"):
        with hooks.registered("before_stpe", print):
            pass
