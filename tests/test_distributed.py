"""``mg.distributed`` on 2 gloo processes on localhost (issue 11, first slice).

Each test starts the ranks as subprocesses running this file (``python tests/test_distributed.py
GROUP RANK WORLD INIT OUT``), bounded by a timeout and killed on failure; each rank runs one group of
checks and saves what it computed, which the test compares with one process, in float64:

* ``exact`` equals one process on the concatenated batch (equal and unequal shards);
* ``local`` equals the average of the single-process directions on the shards;
* a rank with another rule, model or mode fails with ``FingerprintError`` on every rank;
* ``exact`` refuses rules that couple samples in their inner solves.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import moreaugrad as mg
from moreaugrad import distributed as mgd

TIMEOUT_S = 90
LR = 0.3
STEPS = 3
SPLITS = {"equal": (5, 5), "unequal": (7, 3)}


def _model(hidden: int = 6, grouped: bool = False, batchnorm: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    if grouped:
        layers = [nn.Sequential(nn.Linear(4, hidden), nn.ReLU()), nn.Linear(hidden, 3)]
    else:
        layers = [nn.Linear(4, hidden), *([nn.BatchNorm1d(hidden)] if batchnorm else []), nn.ReLU(),
                  nn.Linear(hidden, 5), nn.Tanh(), nn.Linear(5, 3)]
    return nn.Sequential(*layers).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g))
            for _ in range(STEPS)]


def _part(batch: tuple[torch.Tensor, torch.Tensor], split: tuple[int, ...], rank: int):
    x, y = batch
    return x.split(list(split))[rank], y.split(list(split))[rank]


EXACT = {  # name: (rule, objective)
    "backprop": lambda: (mg.rules.backprop(step=LR), mg.losses.CrossEntropy()),
    "moreau": lambda: (mg.rules.moreau(gamma=1.0, alpha=LR), mg.losses.SquaredLoss()),
    "moreau_ce": lambda: (mg.rules.moreau(schedule=mg.rules.Lagrangian(0.5, LR)), mg.losses.CrossEntropy()),
    "moreau_torch_ce": lambda: (mg.rules.moreau(gamma=1.0, alpha=LR),
                                nn.CrossEntropyLoss(label_smoothing=0.1)),
    "fenchel": lambda: (mg.rules.fenchel(0.5, step=LR), mg.losses.CrossEntropy()),
    "fenchel_sum": lambda: (mg.rules.fenchel(0.5, batch_mean=False, step=LR), mg.losses.SquaredLoss()),
    "proxprop_cg3": lambda: (mg.rules.proxprop(tau=LR), mg.losses.CrossEntropy()),
    "proxprop_per_output": lambda: (mg.rules.proxprop(tau=LR, method=mg.lstsq.CG(3, per_output=True)),
                                    mg.losses.CrossEntropy()),
    "proxprop_exact": lambda: (mg.rules.proxprop(tau=LR, method=mg.lstsq.Exact()), mg.losses.CrossEntropy()),
    # Linear+ReLU as one stage: quasi-Newton weight solves whose values and gradients sum over shards
    "moreau_grouped": lambda: (mg.rules.moreau(gamma=1.0, alpha=LR), mg.losses.SquaredLoss()),
    # the augmented Lagrangian: a target objective read at the global B, row solves and per-sample states
    "augmented_lagrangian": lambda: (mg.rules.augmented_lagrangian(alpha=LR), mg.losses.CrossEntropy()),
    # kappa = 1: with the default 1e-5 this L-BFGS weight solve stops on its cap in one process too
    "augmented_lagrangian_grouped": lambda: (mg.rules.augmented_lagrangian(kappa=1.0, alpha=LR),
                                             mg.losses.SquaredLoss()),
}
GROUPED = {"moreau_grouped", "augmented_lagrangian_grouped"}  # EXACT entries run on the grouped model
# The augmented Lagrangian's Tanh state is solved per sample by L-BFGS to a relative tolerance of
# 1e-10, in a loop that runs until every sample of the batch has converged: a shard of 3 samples
# stops after other iterations than the batch of 10, within that tolerance (measured: 1e-10 in the
# first step's directions, 1.6e-10 in the parameters after 3 steps).
TOL = {"augmented_lagrangian": 1e-9, "augmented_lagrangian_grouped": 1e-9}
LOCAL = {
    "backprop": lambda: mg.rules.backprop(step=LR),
    "moreau": lambda: mg.rules.moreau(gamma=1.0, alpha=LR),
    "proxprop_cg3": lambda: mg.rules.proxprop(tau=LR),
    "proxprop_exact": lambda: mg.rules.proxprop(tau=LR, method=mg.lstsq.Exact()),
    "fenchel": lambda: mg.rules.fenchel(0.5, step=LR),
    "augmented_lagrangian": lambda: mg.rules.augmented_lagrangian(alpha=LR),
}
COUPLED = {  # exact mode refuses these: (rule, model)
    "target_prop": lambda: (mg.rules.target_prop(), _model()),
    "backprop_batchnorm": lambda: (mg.rules.backprop(), _model(batchnorm=True)),
}


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train(make_oracle, how: str, parts, **model_kw) -> tuple[dict[str, torch.Tensor], list[float]]:
    """3 optimiser steps: ``.backward`` + SGD, or ``.step``; the final parameters and the losses."""
    model = _model(**model_kw)
    oracle = make_oracle(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for x, y in parts:
        if how == "step":
            losses.append(float(oracle.step(x, y).loss))
        else:
            opt.zero_grad()
            losses.append(float(oracle.backward(x, y).loss))
            opt.step()
    return _params(model), losses


def _local_reference(rule, how: str, split, h=None) -> dict[str, torch.Tensor]:
    """One process: the average over shards of ``mg.Oracle``'s directions, applied by SGD or the
    rule's own steps."""
    model = _model()
    oracle = mg.Oracle(model, h or mg.losses.CrossEntropy(), rule)
    for batch in _batches():
        results = [oracle(*_part(batch, split, r)) for r in range(len(split))]
        for t, stage in enumerate(oracle.chain.stages):
            if results[0].directions[t] is None:
                continue
            avg = {n: sum(r.directions[t][n] for r in results) / len(results)
                   for n in results[0].directions[t]}
            stage.update(avg, LR if how == "backward" else results[0].steps[t])
    return _params(model)


# -- what each rank runs -----------------------------------------------------------------------------


class _Counter:
    """Counts calls of the torch.distributed collectives (wrapped on the module, where the library
    looks them up)."""

    NAMES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "reduce_scatter", "barrier")

    def __init__(self):
        self.counts = dict.fromkeys(self.NAMES, 0)
        for name in self.NAMES:
            fn = getattr(dist, name)

            def wrapped(*a, _fn=fn, _name=name, **k):
                self.counts[_name] += 1
                return _fn(*a, **k)

            setattr(dist, name, wrapped)

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


def _group_exact(rank: int, world: int, out: dict) -> None:
    counter = _Counter()
    for name, make in EXACT.items():
        for split_name, split in SPLITS.items():
            for how in ("backward", "step"):
                rule, h = make()
                parts = [_part(b, split, rank) for b in _batches()]
                before = counter.snapshot()
                oracle_box = []

                def make_oracle(model, rule=rule, h=h, box=oracle_box):
                    box.append(mgd.Oracle(model, h, rule, mode="exact"))
                    return box[0]

                params, losses = _train(make_oracle, how, parts, grouped=name in GROUPED)
                after = counter.snapshot()
                out[("exact", name, split_name, how)] = (params, losses, oracle_box[0]._plan,
                                                          {k: after[k] - before[k] for k in after})
    for name, make in LOCAL.items():
        for how in ("backward", "step"):
            rule = make()
            parts = [_part(b, SPLITS["equal"], rank) for b in _batches()]
            before = counter.snapshot()
            params, losses = _train(lambda m, rule=rule: mgd.Oracle(m, mg.losses.CrossEntropy(), rule,
                                                                     mode="local"), how, parts)
            after = counter.snapshot()
            out[("local", name, how)] = (params, losses, {k: after[k] - before[k] for k in after})


def _group_refuse(rank: int, world: int, out: dict) -> None:
    h = mg.losses.CrossEntropy()

    def attempt(key, build):
        try:
            build()
        except Exception as err:  # noqa: BLE001 - recorded for the test to check
            out[key] = (type(err).__name__, str(err))
        else:
            out[key] = None

    attempt("rule", lambda: mgd.Oracle(_model(), h, mg.rules.backprop() if rank == 0 else mg.rules.moreau()))
    attempt("model", lambda: mgd.Oracle(_model(6 if rank == 0 else 7), h, mg.rules.backprop()))
    attempt("mode", lambda: mgd.Oracle(_model(), h, mg.rules.backprop(), mode="exact" if rank else "local"))
    attempt("step", lambda: mgd.Oracle(_model(), h, mg.rules.backprop(step=1.0 + rank)))
    perturbed = _model()
    with torch.no_grad():
        perturbed[0].bias[0] += 1e-3 * rank
    attempt("weights", lambda: mgd.Oracle(perturbed, h, mg.rules.backprop()))
    for name, make in COUPLED.items():
        rule, model = make()
        attempt(("coupled", name), lambda rule=rule, model=model: mgd.Oracle(model, h, rule, mode="exact"))
    # The group still works after the refusals: a plain exact backprop step.
    model = _model()
    oracle = mgd.Oracle(model, h, mg.rules.backprop())
    out["after"] = float(oracle(*_part(_batches()[0], SPLITS["equal"], rank)).loss)


GROUPS = {"exact": _group_exact, "refuse": _group_refuse}


def _worker(group: str, rank: int, world: int, init: str, path: str) -> None:
    torch.set_num_threads(1)
    out: dict = {}
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        GROUPS[group](rank, world, out)
    except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
        out["__error__"] = traceback.format_exc()
    finally:
        torch.save(out, path)
        dist.destroy_process_group()


def _spawn(group: str, tmp_path: Path, world: int = 2) -> list[dict]:
    """Run ``group`` on ``world`` gloo ranks; kill them all if one fails or the time is up."""
    init = f"file://{tmp_path / 'init'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    paths = [tmp_path / f"rank{r}.pt" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, __file__, group, str(r), str(world), init, str(paths[r])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"{group}: the ranks did not finish in {TIMEOUT_S} s (a hang)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    outs = [torch.load(path, weights_only=False) for path in paths]
    for r, o in enumerate(outs):
        assert "__error__" not in o, f"rank {r}:\n{o['__error__']}"
    return outs


# -- the tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exact_group(tmp_path_factory):
    return _spawn("exact", tmp_path_factory.mktemp("exact"))


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-10) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.parametrize("how", ["backward", "step"])
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("name", list(EXACT))
def test_exact_equals_one_process_on_the_global_batch(exact_group, name, split, how):
    rule, h = EXACT[name]()
    ref, ref_losses = _train(lambda m: mg.Oracle(m, h, rule), how, _batches(), grouped=name in GROUPED)
    for rank, out in enumerate(exact_group):
        params, losses, _, _ = out[("exact", name, split, how)]
        assert _close(params, ref) < TOL.get(name, 1e-10), (rank, _close(params, ref))
        assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) < TOL.get(name, 1e-12)
        assert ref_losses[-1] != ref_losses[0]  # the steps moved the model


@pytest.mark.parametrize("name", ["backprop", "moreau"])
def test_the_average_of_unequal_shards_is_not_the_global_oracle(name):
    """The comparisons above can fail: on unequal shards, ``local`` mode is not the global oracle."""
    rule, h = EXACT[name]()
    ref, _ = _train(lambda m: mg.Oracle(m, h, rule), "step", _batches())
    assert _close(_local_reference(rule, "step", SPLITS["unequal"], h), ref) > 1e-3


@pytest.mark.parametrize("how", ["backward", "step"])
@pytest.mark.parametrize("name", list(LOCAL))
def test_local_equals_the_average_of_the_shard_oracles(exact_group, name, how):
    ref = _local_reference(LOCAL[name](), how, SPLITS["equal"])
    start = _params(_model())
    for out in exact_group:
        params, _, _ = out[("local", name, how)]
        assert _close(params, ref) < 1e-10
        assert _close(params, start) > 1e-3


def test_collectives_per_step(exact_group):
    """The cost in collectives: one all-gather of the fingerprints at construction; per step, one
    all-reduce of the batch size and the shards' status (every rank raises if one shard is empty),
    then one of all directions (one dtype here). ProxProp in ``exact`` mode (the "reduced" plan)
    sums inside the sweep: the batch size, one per proximal stage (its Gram matrix and right-hand
    side together), one for the explicit last stage's vjp, and the loss."""
    out = exact_group[0]
    per_step = {"weighted": 2, "scaled": 2, "reduced": 1 + 2 + 1 + 1, "local": 2}
    for key, value in out.items():
        counts = value[-1]
        plan = value[2] if key[0] == "exact" else "local"
        if key[0] == "exact" and not key[1].startswith("proxprop") and plan == "reduced":
            # one all-reduce per row solve, or per evaluation of a weight problem's value and of
            # its gradient (the line search decides how many), and the batch size and the loss
            assert counts["all_reduce"] > STEPS * 4, (key, counts)
            continue
        assert counts["all_gather_object"] == 1, (key, counts)
        assert counts["all_reduce"] == STEPS * per_step[plan], (key, counts)
        assert sum(counts.values()) == counts["all_gather_object"] + counts["all_reduce"]
    plans = {key[1]: value[2] for key, value in out.items() if key[0] == "exact"}
    assert plans == {"backprop": "weighted", "moreau": "scaled", "moreau_ce": "scaled",
                     "moreau_torch_ce": "scaled", "fenchel": "weighted", "fenchel_sum": "scaled",
                     "proxprop_cg3": "reduced", "proxprop_per_output": "reduced",
                     "proxprop_exact": "reduced", "moreau_grouped": "reduced",
                     "augmented_lagrangian": "reduced", "augmented_lagrangian_grouped": "reduced"}


@pytest.fixture(scope="module")
def refuse_group(tmp_path_factory):
    return _spawn("refuse", tmp_path_factory.mktemp("refuse"))


@pytest.mark.parametrize("what", ["rule", "model", "mode", "step", "weights"])
def test_a_rank_with_another_rule_or_model_fails_on_every_rank(refuse_group, what):
    field = {"rule": "rule", "model": "stages", "mode": "mode", "step": "rule", "weights": "weights"}[what]
    for out in refuse_group:
        kind, message = out[what]
        assert kind == "FingerprintError"
        assert field in message and "ranks [0] have" in message and "ranks [1] have" in message


@pytest.mark.parametrize("name", list(COUPLED))
def test_exact_refuses_rules_that_couple_samples(refuse_group, name):
    names = {"target_prop": "least squares",
             "backprop_batchnorm": "batch norm"}
    for out in refuse_group:
        kind, message = out[("coupled", name)]
        assert kind == "NotImplementedError"
        assert names[name].lower() in message.lower() and "mode='local'" in message
        assert name == "backprop_batchnorm" or "stage" in message
    assert all(isinstance(out["after"], float) for out in refuse_group)


def test_shard_splits_every_sample_once():
    parts = [mgd.shard(11, rank=r, world=3, seed=4) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(11))
    assert [len(p) for p in parts] == [4, 4, 3]
    assert torch.equal(parts[1], mgd.shard(11, rank=1, world=3, seed=4))


def test_batches_split_each_global_batch_over_the_ranks():
    ranks = [list(mgd.batches(10, 4, seed=2, epoch=1, rank=r, world=2)) for r in range(2)]
    whole = torch.randperm(10, generator=torch.Generator().manual_seed(3)).split(4)
    assert [len(b) for b in ranks[0]] == [2, 2, 1] and [len(b) for b in ranks[1]] == [2, 2, 1]
    for a, b, w in zip(*ranks, whole, strict=True):
        assert torch.equal(torch.cat([a, b]), w)


def test_without_a_process_group_the_oracle_says_how_to_start_one():
    with pytest.raises(RuntimeError, match="init_process_group"):
        mgd.Oracle(_model(), mg.losses.CrossEntropy())


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
