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


def test_memory_variable_logs_each_step_end_with_resident_and_peak_memory(monkeypatch, capsys):
    monkeypatch.setenv(progress.MEMORY_VARIABLE, "1")
    with progress.step("loading"):
        pass
    line = capsys.readouterr().err
    if progress.memory_use() is None:  # no /proc: nothing to say
        assert line == ""
        return
    assert line.startswith("[memory] loading: rss ") and ", peak " in line and line.endswith(" GiB\n")


def test_without_the_memory_variable_steps_write_nothing(monkeypatch, capsys):
    monkeypatch.delenv(progress.MEMORY_VARIABLE, raising=False)
    with progress.step("loading"):
        pass
    assert capsys.readouterr().err == ""


def test_memory_use_reads_a_peak_no_lower_than_the_resident_size():
    use = progress.memory_use()
    assert use is None or 0 < use[0] <= use[1]
