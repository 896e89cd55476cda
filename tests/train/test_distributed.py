"""Data-parallel helpers: torchrun's environment, shards equal to torch's DistributedSampler, and real 2-process
gloo groups (joined through env:// as torchrun does) for reductions, broadcasts and a DDP training step."""


import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from helpers import join_ranks, run_ranks
from vitlab.errors import VitlabError
from vitlab.model import create_model, parse_variant
from vitlab.train import distributed as D

WORLD = 2
GLOBAL_BATCH, STEPS = 8, 3


# ---- environment -----------------------------------------------------------------------------------------
def test_detect_reads_torchrun_variables():
    assert D.detect({}) == D.DistEnv(0, 1, 0)
    env = D.detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert env == D.DistEnv(3, 4, 1) and env.distributed and not env.is_main
    assert D.detect({"WORLD_SIZE": "2"}) == D.DistEnv(0, 2, 0)
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}, {"RANK": "1"}):
        with pytest.raises(VitlabError, match="RANK"):
            D.detect(bad)


def test_one_process_is_a_no_op(monkeypatch):
    for name in D.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert D.init_distributed("cpu") == D.DistEnv()
    model = torch.nn.Linear(2, 2)
    assert D.wrap_ddp(model) is model and D.unwrap_ddp(model) is model
    assert D.is_main() and D.get_world_size() == 1
    assert D.all_reduce_sum({"a": 2, "b": torch.tensor(3.5)}) == {"a": 2.0, "b": 3.5}
    assert D.broadcast_object({"steps": 7}) == {"steps": 7}


# ---- shards ----------------------------------------------------------------------------------------------
class _Sized:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize("n", [1, 7, 10, 16])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_shard_permutation_is_distributed_samplers(n, world, drop_last):
    for epoch in (0, 5):
        for rank in range(world):
            ref = DistributedSampler(_Sized(n), num_replicas=world, rank=rank, shuffle=True, seed=11,
                                     drop_last=drop_last)
            ref.set_epoch(epoch)
            got = D.shard_permutation(n, seed=11, epoch=epoch, rank=rank, world_size=world, drop_last=drop_last)
            assert got.tolist() == list(ref)


def test_shards_are_disjoint_and_complete():
    n, world = 23, 3
    perm = D.epoch_permutation(n, seed=0, epoch=2)
    exact = [D.shard(perm, rank=r, world_size=world, mode="exact") for r in range(world)]
    assert sorted(torch.cat(exact).tolist()) == list(range(n))  # each example on exactly one rank
    drop = [D.shard(perm, rank=r, world_size=world, mode="drop") for r in range(world)]
    flat = torch.cat(drop).tolist()
    assert len(flat) == len(set(flat)) == n - n % world and {len(s) for s in drop} == {n // world}
    pad = [D.shard(perm, rank=r, world_size=world, mode="pad") for r in range(world)]
    assert set(torch.cat(pad).tolist()) == set(range(n)) and {len(s) for s in pad} == {-(-n // world)}
    assert not torch.equal(perm, D.epoch_permutation(n, seed=0, epoch=3))  # a new order every epoch


# ---- real process groups ---------------------------------------------------------------------------------
def _tiny_vit():
    cfg = parse_variant("test", depth=2, image_size=8, num_classes=3)
    return create_model(cfg, seed=0)


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (STEPS, GLOBAL_BATCH), generator=g)
    return x, y


def _train(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(x[step]), y[step]).backward()
        opt.step()


def _worker(rank, world, port, out_dir):
    join_ranks(rank, world, port)
    env = D.init_distributed("cpu")
    try:
        import torch.distributed as dist

        result = {"env": env, "backend": dist.get_backend(), "main": D.is_main(),
                  "sums": D.all_reduce_sum({"rank": rank, "ones": 1, "big": 2.0**40 + rank}),
                  "broadcast": D.broadcast_object({"steps": 100 + rank, "from": rank})}
        model = create_model(_tiny_vit().cfg, seed=100 + rank)  # rank 1 starts elsewhere: DDP broadcasts rank 0's
        if rank == 0:
            model.load_state_dict(_tiny_vit().state_dict())
        model = D.wrap_ddp(model)
        result["wrapped"] = type(model).__name__
        x, y = _data()
        per_rank = GLOBAL_BATCH // WORLD
        _train(model, x[:, rank * per_rank:(rank + 1) * per_rank], y[:, rank * per_rank:(rank + 1) * per_rank])
        result["state"] = {k: v.clone() for k, v in D.unwrap_ddp(model).state_dict().items()}
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        D.close_distributed()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return run_ranks(_worker, out, world=WORLD)


def test_env_rendezvous_joins_a_gloo_group(two_ranks):
    for rank, r in enumerate(two_ranks):
        assert r["env"] == D.DistEnv(rank, WORLD, rank) and r["backend"] == "gloo"
        assert r["main"] == (rank == 0) and r["wrapped"] == "DistributedDataParallel"


def test_reduce_and_broadcast(two_ranks):
    for r in two_ranks:
        assert r["sums"] == {"rank": 1.0, "ones": 2.0, "big": 2.0**41 + 1}  # float64: exact past 2^24
        assert r["broadcast"] == {"steps": 100, "from": 0}


def test_ddp_steps_equal_one_process_on_the_global_batch(two_ranks):
    model = _tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, *_data())
    for r in two_ranks:
        for k, v in model.state_dict().items():
            torch.testing.assert_close(r["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(moved) > 10  # the comparison is not between two untrained models
