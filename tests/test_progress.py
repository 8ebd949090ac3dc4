"""Named steps reach the listeners installed around them, with their durations, and nobody else."""

import time

from qwen_mobile import progress


def test_a_listener_hears_each_step_start_and_end_in_order():
    heard = []
    with progress.reporting(lambda step, seconds: heard.append((step, seconds))):
        with progress.step("outer"):
            with progress.step("inner"):
                time.sleep(0.01)
    assert [(step, seconds is None) for step, seconds in heard] == [
        ("outer", True), ("inner", True), ("inner", False), ("outer", False)
    ]
    inner, outer = heard[2][1], heard[3][1]
    assert 0.01 <= inner <= outer


def test_steps_outside_reporting_reach_no_listener():
    heard = []
    with progress.reporting(lambda step, seconds: heard.append(step)):
        pass
    with progress.step("after"):
        pass
    assert heard == []


def test_notices_reach_their_listener_only_while_reporting():
    heard = []
    with progress.reporting(lambda step, seconds: None, heard.append):
        progress.notice("removed a stale directory")
    progress.notice("unheard")
    assert heard == ["removed a stale directory"]
