"""Multi-process training (issue 15 item 4): sharding rules, and 2 gloo processes against 1 on the CPU.

The reference for the 2-process run is a 1-process run of the same recipe at twice the batch size
(the per-process batch size times the processes), made by the same command without torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from qdistill.data import make_loader
from qdistill.data.loaders import EpochSampler
from qdistill.errors import QdistillError
from qdistill.kd import CachedTeacherLoader
from qdistill.train import distributed
from qdistill.train.distributed import ShardedEpochSampler, shard_loader

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.parametrize("size, world", [(10, 2), (11, 3), (64, 4), (5, 8)])
def test_shards_deal_the_epoch_order_like_distributed_sampler(size, world):
    inner = EpochSampler(size, seed=3)
    inner.set_epoch(2)
    order = list(inner)
    total = -(-size // world) * world
    padded = (order * world)[:total]  # DistributedSampler pads by repeating the start of the order
    shards = [list(ShardedEpochSampler(inner, rank, world)) for rank in range(world)]
    assert all(len(shard) == total // world for shard in shards)
    for rank, shard in enumerate(shards):
        assert shard == padded[rank::world]


def test_the_ranks_batches_together_are_the_single_process_batches():
    x = torch.arange(20.0).reshape(20, 1)
    single = [batch[0].flatten().tolist() for batch in make_loader(x, None, 4, seed=1, shuffle=True)]
    per_rank = [[batch[0].flatten().tolist() for batch in shard_loader(make_loader(x, None, 2, seed=1, shuffle=True), rank, 2)]
                for rank in range(2)]
    for step, expected in enumerate(single):
        assert sorted(per_rank[0][step] + per_rank[1][step]) == sorted(expected)


def test_the_teacher_logit_cache_is_read_per_rank():
    x = torch.arange(8.0).reshape(8, 1)
    cached = CachedTeacherLoader.wrap(make_loader(x, torch.zeros(8, dtype=torch.long), 2, seed=0, shuffle=False),
                                      torch.nn.Linear(1, 1))
    for rank in range(2):
        for inputs, _, logits in shard_loader(cached, rank, 2):
            assert inputs.flatten().tolist() == [value for value in inputs.flatten().tolist() if value % 2 == rank]
            torch.testing.assert_close(logits, cached.logits[inputs.flatten().long()], atol=0, rtol=0)


def test_a_loader_it_cannot_shard_is_refused():
    with pytest.raises(QdistillError, match="cannot be sharded across processes; allowed: qdistill's loaders"):
        shard_loader([torch.zeros(2, 1)], 0, 2)


RECIPE = {"model": {"name": "mnist_cnn", "kwargs": {"dropout": 0.0}},  # no dropout: both runs draw the same forward
          "data": {"name": "digits", "batch_size": 64, "limit": 200},  # 128 training samples: 2 steps of 64
          "quant": {"weight_bits": 4, "act_bits": 4}, "train": {"epochs": 1, "lr": 2e-3},
          "teacher_train": {"epochs": 1, "lr": 3e-3}, "export": {"onnx": False, "packed": False}}


def _run(command: list[str], folder: Path, *overrides: str) -> dict:
    environment = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    recipe = folder.parent / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    done = subprocess.run([*command, "run", str(recipe), *overrides, "--out", str(folder), "--no-progress"],
                          env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((folder / "report.json").read_text())


@pytest.mark.slow
def test_two_gloo_processes_at_half_the_batch_match_one_process(tmp_path):
    one = _run([sys.executable, "-m", "qdistill"], tmp_path / "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "qdistill"]
    two = _run(torchrun, tmp_path / "two", "data.batch_size=32")
    # the teacher trains in both processes (DDP) on the same global batches: its losses agree to float rounding
    assert [row["loss"] for row in two["teacher"]["history"]] == pytest.approx(
        [row["loss"] for row in one["teacher"]["history"]], rel=1e-6)
    # the student's first steps (one epoch of 2 steps): the same losses to float tolerance
    for key in ("loss", "kd_loss", "task_loss"):
        assert two["history"][0][key] == pytest.approx(one["history"][0][key], rel=1e-4)
    assert abs(two["student"]["accuracy"] - one["student"]["accuracy"]) <= 0.002 + 1e-12
    # rank 0 alone wrote the run folder: one of each file, no leftovers of another rank
    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == sorted(
        path.name for path in (tmp_path / "one").iterdir())
    # --resume with 2 processes: the finished run is read back (teacher and checkpoint), same result
    again = _run(torchrun, tmp_path / "two", "data.batch_size=32", "--resume")
    assert again["history"] == two["history"] and again["student"]["accuracy"] == two["student"]["accuracy"]


@pytest.mark.parametrize("world, inplace", [(2, False), (3, True)])
def test_dropout_on_a_rank_applies_the_global_batch_mask_rows_of_its_samples(world, inplace):
    x = torch.randn(6 * world, 5)
    layer = torch.nn.Dropout(0.4, inplace=inplace).train()
    torch.manual_seed(11)
    one = torch.nn.functional.dropout(x.clone(), 0.4, training=True)  # one process, the global batch
    for rank in range(world):
        torch.manual_seed(11)  # every rank seeded alike
        with distributed.global_batch_dropout(layer, rank_=rank, world=world):
            shard = layer(x[rank::world].clone())
        assert torch.equal(shard, one[rank::world])
    assert "forward" not in layer.__dict__  # the layer is plain nn.Dropout again


STEP_SCRIPT = '''
import json, sys, torch
from qdistill.data import make_loader
from qdistill.models.convnet import ConvNet
from qdistill.quant import prepare
from qdistill.recipe import QuantSpec, TrainSpec
from qdistill.train import Supervised, distributed, fit
distributed.setup()
torch.manual_seed(5)
x, y = torch.rand(128, 1, 12, 12), torch.randint(0, 4, (128,))
loader = make_loader(x, y, int(sys.argv[1]), seed=3, shuffle=True)
spec = TrainSpec(epochs=3, lr=3e-3, schedule="cosine")
result = {}
for name in ("float", "qat"):
    torch.manual_seed(6)
    model = ConvNet(image_size=12, width=4, hidden=16, num_classes=4, dropout=0.3)
    if name == "qat":
        model = prepare(model, QuantSpec(weight_bits=4, act_bits=4), calibration_data=distributed.global_loader(loader))
    history = fit(Supervised(model), loader, spec, show_progress=False)
    state = {key: value.flatten().tolist() for key, value in model.state_dict().items() if value.is_floating_point()}
    result[name] = {"losses": [row["loss"] for row in history], "state": state}
if distributed.is_main():
    json.dump(result, open(sys.argv[2], "w"))
distributed.teardown()
'''


@pytest.mark.slow  # three processes start and train twice: 20 s and more on 2 cores
def test_two_processes_take_the_steps_of_one_process_at_twice_the_batch(tmp_path):
    """2 processes at batch 32 against 1 at batch 64, dropout on (3 epochs of 2 steps, Adam, cosine schedule).

    A float network: every epoch's loss and the trained weights agree to float rounding (the sums
    of the gradients run in another order). The W4A4 student: the first epoch agrees as closely;
    later, a last-bit difference in a weight or step size can move a value across a rounding
    boundary of the 4-bit grid, which one process also does with 2 threads instead of 1 (its
    own summation order), so only the first epoch is held to float rounding.
    """
    script = tmp_path / "steps.py"
    script.write_text(STEP_SCRIPT)
    environment = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for command, batch, name in (([sys.executable], 64, "one"), (torchrun, 32, "two")):
        done = subprocess.run([*command, str(script), str(batch), str(tmp_path / f"{name}.json")], env=environment,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    assert two["float"]["losses"] == pytest.approx(one["float"]["losses"], rel=1e-6)
    for key, values in one["float"]["state"].items():
        np.testing.assert_allclose(two["float"]["state"][key], values, rtol=1e-5, atol=1e-6, err_msg=key)
    assert two["qat"]["losses"][0] == pytest.approx(one["qat"]["losses"][0], rel=1e-6)
