import pytest

from distill3d.engine.schedules import Schedule, ScheduleError, schedule_value


def test_constant_linear_piecewise():
    assert schedule_value(3, 100, 1000) == 3.0
    lin = Schedule.parse({"linear": [[0, 0.98], [1000, 0.5]]}).resolve(1000)
    assert lin(0) == pytest.approx(0.98) and lin(500) == pytest.approx(0.74) and lin(2000) == pytest.approx(0.5)
    assert lin(-5) == pytest.approx(0.98)
    pw = Schedule.parse({"piecewise": [[0, 64], [300, 128], [600, 256]]}).resolve(1000)
    assert [pw(0), pw(299), pw(300), pw(599), pw(600), pw(10**6)] == [64, 64, 128, 128, 256, 256]


def test_percent_steps_resolve_against_total():
    s = Schedule.parse({"piecewise": [[0, 1], ["30%", 2], ["60%", 3]]}).resolve(500)
    assert s(149) == 1 and s(150) == 2 and s(300) == 3


@pytest.mark.parametrize("spec", [{"cubic": [[0, 1]]}, {"linear": []}, {"linear": [[0]]}, "fast", True])
def test_bad_specs(spec):
    with pytest.raises(ScheduleError):
        Schedule.parse(spec, "x").resolve(10)


def test_unordered_points_rejected():
    with pytest.raises(ScheduleError, match="non-decreasing"):
        Schedule.parse({"linear": [[10, 1], [5, 2]]}).resolve(100)
