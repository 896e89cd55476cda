"""The time budget with an injected clock: where simulated runs end against their budget, never real time.

The end-to-end version (the real Trainer driven by the same kind of clock) is in test_loop.py; here the
`Budget` is driven the way the loop drives it, over many step/evaluation costs and drifting machines.
"""

import json
import subprocess
import sys
import time

import pytest

from vitlab.errors import VitlabError
from vitlab.train.budget import Budget, plan_steps, process_age_s, run_cost


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


TEARDOWN_S = 0.9  # interpreter exit after the last file, as measured on the 2-core CPU


def simulate(budget_s, *, step_cost, epoch_end_cost, steps_per_epoch, startup_s=4.0, exit_s=TEARDOWN_S):
    """A run as the loop makes it: returns (end of the process, steps done, steps the schedule planned)."""
    clock = FakeClock()
    clock.advance(startup_s)
    budget = Budget(budget_s, steps_per_epoch=steps_per_epoch, clock=clock, start=0.0)
    # the first plan: a few timed steps and a timed slice of the evaluation, all on the clock
    for _ in range(3):
        clock.advance(step_cost(clock.t))
    probe = epoch_end_cost(clock.t)
    clock.advance(2 * probe)
    total = budget.plan(step=0, step_s=step_cost(clock.t), epoch_end_s=probe)
    step, finished = 0, False
    while not finished:
        stopped = False
        for _ in range(steps_per_epoch):
            if step >= total:
                break
            if budget.should_stop():
                stopped = True
                break
            clock.advance(step_cost(clock.t))
            step += 1
            budget.observe_step()
            if budget.refit_due():
                total = budget.fit(step)
        finished = stopped or step >= total or budget.should_stop(after_epoch_end=True)
        cost = epoch_end_cost(clock.t)
        clock.advance(cost)
        budget.observe_epoch_end(cost)
        if not finished:
            total = budget.fit(step)
    clock.advance(exit_s)
    return clock.t, step, total


COSTS = [  # (step seconds, evaluation + save seconds, steps per epoch)
    (0.30, 4.0, 195), (0.10, 6.0, 195), (0.05, 1.0, 40), (1.5, 3.0, 50), (0.02, 8.0, 1000), (0.4, 0.5, 7),
]


@pytest.mark.parametrize("budget_s", [60, 180, 900, 3600])
@pytest.mark.parametrize("step_s, eval_s, spe", COSTS)
def test_steady_machine_ends_in_the_last_5_percent(budget_s, step_s, eval_s, spe):
    end, step, total = simulate(budget_s, step_cost=lambda t: step_s, epoch_end_cost=lambda t: eval_s,
                                steps_per_epoch=spe)
    assert 0.95 * budget_s <= end <= budget_s, (end, step)
    assert step == total  # ended by its schedule (the cosine ran to its end), not by the hard stop


DRIFTS = {
    "slower at half time": (lambda B: lambda t: 0.3 if t < B / 2 else 0.5, lambda B: lambda t: 3.0),
    "faster at half time": (lambda B: lambda t: 0.5 if t < B / 2 else 0.3, lambda B: lambda t: 3.0),
    "2x slower near the end": (lambda B: lambda t: 0.2 if t < 0.9 * B else 0.4, lambda B: lambda t: 3.0),
    "2x faster near the end": (lambda B: lambda t: 0.4 if t < 0.9 * B else 0.2, lambda B: lambda t: 3.0),
    "steadily slower": (lambda B: lambda t: 0.2 + 0.3 * t / B, lambda B: lambda t: 2.0),
    "steadily faster": (lambda B: lambda t: 0.5 - 0.3 * t / B, lambda B: lambda t: 2.0),
    "evaluation gets slower": (lambda B: lambda t: 0.3, lambda B: lambda t: 2.0 if t < B / 2 else 6.0),
    "noisy steps": (lambda B: lambda t: 0.3 * (1 + 0.5 * ((int(t * 7919) % 13) / 12 - 0.5)), lambda B: lambda t: 3.0),
}


@pytest.mark.parametrize("budget_s", [180, 900])
@pytest.mark.parametrize("drift", DRIFTS)
def test_drifting_machine_still_ends_in_the_last_5_percent(budget_s, drift):
    steps, evals = DRIFTS[drift]
    end, step, total = simulate(budget_s, step_cost=steps(budget_s), epoch_end_cost=evals(budget_s),
                                steps_per_epoch=195)
    assert 0.95 * budget_s <= end <= budget_s, (end, step, total)


@pytest.mark.parametrize("at, slow", [(150, 0.5), (170, 0.5), (174, 0.5), (176, 0.5), (174, 1.6), (173, 3.0)])
def test_a_sudden_slowdown_near_the_end_still_ends_in_time(at, slow):
    """Steps become many times slower a few seconds before the end, between two refits (174 s, 1.6 s: only
    the hard stop keeps the run inside its budget)."""
    end, step, total = simulate(180, step_cost=lambda t: 0.1 if t < at else slow, epoch_end_cost=lambda t: 2.0,
                                steps_per_epoch=195)
    assert 0.95 * 180 <= end <= 180, (end, step, total)


def test_too_short_a_budget_is_one_clear_error():
    clock = FakeClock(50.0)
    budget = Budget(60, steps_per_epoch=100, clock=clock, start=0.0)
    with pytest.raises(VitlabError, match="time budget of 1 min is too short"):
        budget.plan(step=0, step_s=1.0, epoch_end_s=20.0)


def test_a_resumed_run_gets_what_the_first_process_left():
    clock = FakeClock(0.0)
    fresh = Budget(600, steps_per_epoch=100, clock=clock)
    resumed = Budget(600, steps_per_epoch=100, clock=clock)
    resumed.carry_over(200.0)
    assert fresh.left() - resumed.left() == pytest.approx(200.0)
    assert resumed.plan(step=300, step_s=0.5, epoch_end_s=5.0) - 300 < fresh.plan(step=0, step_s=0.5, epoch_end_s=5.0)


def test_the_final_evaluations_extra_time_is_planned_explicitly_and_kept_across_a_resume():
    """TTA's extra final passes (`final_s`) come in through plan(), as seconds the exit needs, and nothing
    else moves the exit: the plan is the no-TTA plan of a budget shorter by final_s, and a resumed process
    (state_dict) keeps the reserve."""
    clock = FakeClock(0.0)
    plain, tta, shorter = (Budget(600, steps_per_epoch=100, clock=clock) for _ in range(3))
    shorter.deadline -= 30.0
    total = tta.plan(step=0, step_s=0.5, epoch_end_s=5.0, final_s=30.0)
    assert total == shorter.plan(step=0, step_s=0.5, epoch_end_s=5.0)
    assert total < plain.plan(step=0, step_s=0.5, epoch_end_s=5.0)
    assert tta.exit_s == plain.exit_s  # the exit estimate itself is untouched
    # the hard stop keeps room for the final passes too: just before the deadline less one step, an evaluation,
    # the exit and the final passes, both still go on; 31 s later only the budget without TTA does
    clock.advance(tta.deadline - 0.5 - 5.0 - tta.exit_s - 30.0 - 1.0)
    assert not tta.should_stop() and not plain.should_stop()
    clock.advance(2.0)
    assert tta.should_stop() and not plain.should_stop()
    resumed = Budget(600, steps_per_epoch=100, clock=clock)
    resumed.load_state_dict(json.loads(json.dumps(tta.state_dict())))
    assert resumed.final_s == 30.0


def test_process_age_brackets_the_process_start():
    """A child's start time from process_age_s lies between just before it was spawned and when it ended."""
    if process_age_s() is None:
        pytest.skip("no /proc process start time on this system")
    before = time.time()
    code = ("import json, time; from vitlab.train.budget import process_age_s; time.sleep(0.3); "
            "print(json.dumps({'age': process_age_s(), 'now': time.time()}))")
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    after = time.time()
    start = out["now"] - out["age"]
    assert out["age"] >= 0.3
    assert before - 0.05 <= start <= after


def test_run_cost_counts_one_evaluation_per_started_epoch():
    assert run_cost(10, step_s=1.0, epoch_s=5.0, steps_per_epoch=10) == 15.0
    assert run_cost(11, step_s=1.0, epoch_s=5.0, steps_per_epoch=10) == 21.0  # a partial epoch still evaluates
    assert run_cost(5, step_s=1.0, epoch_s=5.0, steps_per_epoch=10, phase=7) == 15.0  # crosses one epoch end


def test_plan_steps_is_the_largest_that_fits():
    # 100 steps/epoch at 0.1 s + 5 s per evaluation: one epoch costs 15 s.
    assert plan_steps(15.0, step_s=0.1, epoch_s=5.0, steps_per_epoch=100) == 100
    # 14.95 s left after the first epoch: 5 s evaluation + 99.5 steps
    assert plan_steps(29.95, step_s=0.1, epoch_s=5.0, steps_per_epoch=100) == 100 + 99
    assert plan_steps(30.0, step_s=0.1, epoch_s=5.0, steps_per_epoch=100) == 200
    assert plan_steps(20.45, step_s=0.1, epoch_s=5.0, steps_per_epoch=100) == 100 + 4  # 5.45 s: eval + 4 steps
    assert plan_steps(5.05, step_s=0.1, epoch_s=5.0, steps_per_epoch=100) == 0
    assert plan_steps(-1.0, step_s=0.1, epoch_s=5.0, steps_per_epoch=100) == 0
    for budget in (7.0, 33.3, 151.0, 1000.0):
        n = plan_steps(budget, step_s=0.07, epoch_s=3.0, steps_per_epoch=37, phase=11)
        assert run_cost(n, step_s=0.07, epoch_s=3.0, steps_per_epoch=37, phase=11) <= budget
        assert run_cost(n + 1, step_s=0.07, epoch_s=3.0, steps_per_epoch=37, phase=11) > budget
