"""The shared loop's distributed glue (vitlab.train.parallel) on a real 2-process gloo group: sharded evaluation
equals one process's, every rank's generators round-trip through a checkpoint, and a time budget decided on rank
0 keeps ranks whose clocks disagree tenfold on the same step count. One-process behaviour without a group."""

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import join_ranks, run_ranks
from vitlab.errors import VitlabError
from vitlab.model import create_model, parse_variant
from vitlab.train import callbacks, checkpoint, parallel
from vitlab.train import distributed as D
from vitlab.train.evaluate import evaluate, evaluate_sharded
from vitlab.train.loop import Trainer
from vitlab.train.recipes import RunConfig
from vitlab.train.task import Batch, Task

WORLD = 2
N_TRAIN, N_TEST, SIZE, CLASSES = 64, 23, 8, 3  # 23: the ranks' evaluation shards differ in size
STEP_S = (0.4, 4.0)  # simulated seconds per training step on rank 0 and rank 1


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=g, dtype=torch.uint8), \
        torch.randint(0, CLASSES, (n,), generator=g)


def _model():
    return create_model(parse_variant("test", image_size=SIZE, num_classes=CLASSES), seed=0)


class ToyTask(Task):
    """Random images in memory, cross-entropy, sharded evaluation: the smallest task the loop runs."""

    kind, command = "toy", "toy"

    def __init__(self, config, *, device):
        super().__init__(config, device=device)
        self.images, self.labels = _data(N_TRAIN, 0)
        self.test = _data(N_TEST, 1)
        self.generators = {"augment": torch.Generator().manual_seed(config.seed + 1)}

    train_size, eval_size = N_TRAIN, N_TEST

    def build_model(self):
        return _model()

    def batch(self, index, step, *, size=None):
        x = self.images[index].float() / 255 + 0.01 * torch.randn(len(index), 3, SIZE, SIZE,
                                                                   generator=self.generators["augment"])
        return Batch(x, self.labels[index], self.labels[index], len(index))

    def loss(self, logits, batch):
        return F.cross_entropy(logits, batch.targets)

    def evaluate(self, model, *, precision, progress=False, limit=None, final=False):
        images, labels = self.test
        return evaluate_sharded(model, images[:limit], labels[:limit], mean=(0.5,) * 3, std=(0.25,) * 3,
                                         num_classes=CLASSES, batch_size=5, precision=precision).summary("test_")

    def save(self, model, run_dir):
        model.save_pretrained(run_dir)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _worker(rank, world, port, out):
    join_ranks(rank, world, port)
    D.init_distributed("cpu", timeout_s=120)  # a rank that diverged would fail the test in minutes, not hang it
    try:
        result = {}
        # evaluation: shards of 12 and 11 images, the sums all-reduced
        images, labels = _data(N_TEST, 1)
        res = evaluate_sharded(_model(), images, labels, mean=(0.5,) * 3, std=(0.25,) * 3,
                                        num_classes=CLASSES, batch_size=5)
        result["eval"] = (res.loss, res.top1, res.top5, res.count, res.confusion)
        # generators: each rank its own stream; the checkpoint holds all of them
        gens = {"augment": torch.Generator().manual_seed(1)}
        checkpoint.seed_rank(gens, seed=0)
        saved = checkpoint.gather_rng(gens)
        drawn = (torch.rand(3).tolist(), torch.rand(3, generator=gens["augment"]).tolist())
        torch.manual_seed(123)
        gens["augment"].manual_seed(456)
        checkpoint.restore_rank_rng(saved, gens, seed=0, step=0, source="test")
        result["rng"] = {"keys": sorted(saved), "drawn": drawn,
                         "again": (torch.rand(3).tolist(), torch.rand(3, generator=gens["augment"]).tolist())}
        result["agreed"] = parallel.agreed(f"rank {rank}")
        # a time-budget run in which rank 1's clock runs 10x slower than rank 0's
        clock = FakeClock()
        real_step, real_eval = Trainer.train_step, ToyTask.evaluate

        def step(self, batch):
            clock.t += STEP_S[rank]
            return real_step(self, batch)

        def evaluate_(self, model, **kw):
            clock.t += 1.0
            return real_eval(self, model, **kw)

        Trainer.train_step, ToyTask.evaluate = step, evaluate_
        callbacks.figures = lambda: None
        config = RunConfig(batch_size=8, epochs=1000, time_budget=1.0, precision="fp32", eval_batch_size=8,
                           warmup_epochs=0.5)
        trainer = Trainer(ToyTask(config, device=torch.device("cpu")), f"{out}/budget", record={"task": "toy"},
                          progress=False, log=lambda s: None, clock=clock, started_at=0.0)
        res = trainer.run()
        result["budget"] = {"steps": trainer.step, "total": trainer.total_steps, "rows": len(res.metrics),
                            "top1": res.final["test_top1"], "clock": clock.t}
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        D.close_distributed()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    return out, run_ranks(_worker, out, world=WORLD)


def test_sharded_evaluation_equals_one_process(two_ranks):
    images, labels = _data(N_TEST, 1)
    ref = evaluate(_model(), images, labels, mean=(0.5,) * 3, std=(0.25,) * 3, num_classes=CLASSES, batch_size=5)
    for r in two_ranks[1]:
        loss, top1, top5, count, confusion = r["eval"]
        assert count == N_TEST and torch.equal(confusion, ref.confusion)
        assert top1 == ref.top1 and top5 == ref.top5 and loss == pytest.approx(ref.loss, rel=1e-6)


def test_every_ranks_generators_round_trip(two_ranks):
    r0, r1 = (r["rng"] for r in two_ranks[1])
    assert r0["keys"] == r1["keys"] == ["gen.augment", "rank1.gen.augment", "rank1.torch", "torch"]
    assert r0["again"] == r0["drawn"] and r1["again"] == r1["drawn"]  # each rank's own state came back
    assert r0["drawn"][1] != r1["drawn"][1] and r0["drawn"][0] != r1["drawn"][0]  # streams of their own


def test_rank_zeros_decisions_hold_everywhere(two_ranks):
    out, (r0, r1) = two_ranks
    assert r0["agreed"] == r1["agreed"] == "rank 0"
    b0, b1 = r0["budget"], r1["budget"]
    assert b0["steps"] == b1["steps"] == b0["total"] == b1["total"] and b0["rows"] == b1["rows"]
    assert b0["clock"] <= 60 < 3 * 60 < b1["clock"]  # by rank 1's own clock the budget ran out long before
    assert b0["steps"] > 50  # rank 0's plan: 1 min of 0.4 s steps and 1 s evaluations
    assert b0["top1"] == b1["top1"]
    plan = json.loads((out / "budget" / "train_config.json").read_text())["plan"]
    assert plan["world_size"] == WORLD and plan["global_batch_size"] == 16 and plan["batch_size"] == 8
    assert plan["step_s"] == pytest.approx(STEP_S[0])  # rank 0's timing planned the run


# ---- one process, no group ------------------------------------------------------------------------------
@pytest.fixture
def one_process(monkeypatch):
    for name in (*D.ENV_VARS, parallel.RESTART_COUNT, parallel.RUN_ID):
        monkeypatch.delenv(name, raising=False)


def test_one_process_is_unchanged(one_process):
    gens = {"augment": torch.Generator().manual_seed(5)}
    state = gens["augment"].get_state()
    checkpoint.seed_rank(gens, seed=0)
    assert torch.equal(gens["augment"].get_state(), state)  # rank 0 keeps the single-process seeds
    assert parallel.agreed(7) == 7 and parallel.describe_batch(32) == "32"
    assert parallel.launch_record() == {"world_size": 1}
    assert sorted(checkpoint.gather_rng(gens)) == ["gen.augment", "torch"]


def test_batch_sizes(one_process, monkeypatch):
    assert parallel.batch_sizes(256, 100, None) == (100, 100)  # never more than the data
    assert parallel.batch_sizes(32, 1000, {"batch_size": 32}) == (32, 32)  # a plan from before world sizes
    monkeypatch.setattr(parallel, "get_world_size", lambda: 4)
    assert parallel.batch_sizes(32, 1000, None) == (32, 128)
    assert parallel.batch_sizes(32, 1000, {"batch_size": 64, "global_batch_size": 64}) == (16, 64)
    with pytest.raises(VitlabError, match="global batch of 64 does not split over 3"):
        monkeypatch.setattr(parallel, "get_world_size", lambda: 3)
        parallel.batch_sizes(32, 1000, {"batch_size": 32, "global_batch_size": 64})


def test_restarted_run_needs_a_restart_of_the_same_job(one_process, monkeypatch, tmp_path):
    (tmp_path / "train_config.json").write_text(json.dumps({"launch": {"world_size": 2, "run_id": "job-a"}}))
    assert not parallel.restarted_run(tmp_path)  # not under torchrun
    monkeypatch.setenv(parallel.RUN_ID, "job-a")
    monkeypatch.setenv(parallel.RESTART_COUNT, "0")
    assert not parallel.restarted_run(tmp_path)  # the first attempt never resumes: a reused --out is an error
    monkeypatch.setenv(parallel.RESTART_COUNT, "1")
    assert parallel.restarted_run(tmp_path) and not parallel.restarted_run(tmp_path / "elsewhere")
    monkeypatch.setenv(parallel.RUN_ID, "job-b")
    assert not parallel.restarted_run(tmp_path)  # another job's run


def test_epoch_sums_are_checked(one_process):
    assert checkpoint.read_epoch_sums({}, "s") == {}
    assert checkpoint.read_epoch_sums({"epoch_sums": {"loss": 3.5, "correct": 4}}, "s") == {"loss": 3.5, "correct": 4}
    for bad in ({"loss": "x"}, {"loss": float("nan")}, {"loss": 1.0, "correct": -1}):
        with pytest.raises(VitlabError, match="epoch_sums"):
            checkpoint.read_epoch_sums({"epoch_sums": bad}, "s")
