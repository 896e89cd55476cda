"""Fitting steps into a time budget: hand-computed cases of plan_steps."""

from vitlab.train.budget import margin_s, plan_steps, run_cost


def test_run_cost_counts_one_evaluation_per_started_epoch():
    assert run_cost(10, step_s=1.0, epoch_s=5.0, steps_per_epoch=10) == 15.0
    assert run_cost(11, step_s=1.0, epoch_s=5.0, steps_per_epoch=10) == 21.0  # a partial epoch still evaluates


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
        n = plan_steps(budget, step_s=0.07, epoch_s=3.0, steps_per_epoch=37)
        assert run_cost(n, step_s=0.07, epoch_s=3.0, steps_per_epoch=37) <= budget
        assert run_cost(n + 1, step_s=0.07, epoch_s=3.0, steps_per_epoch=37) > budget


def test_margin_grows_with_budget():
    assert margin_s(60) == 0.05 * 60 + 10
    assert margin_s(3600) > margin_s(600) > margin_s(60)
