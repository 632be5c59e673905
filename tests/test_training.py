"""The loop's parts (mhc_lm/training.py): the state a checkpoint saves, the periodic-action rule, and
which engine strategy reads the gradient norms when."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from mhc_lm.training import Backward, DeepSpeedBackward, TrainState, due, make_backward


def test_train_state_advances_and_round_trips_through_its_state_dict():
    state = TrainState()
    state.advance(tokens=512, seconds=0.25)
    state.advance(tokens=512, seconds=0.5)
    assert state.state_dict() == {"step": 2, "tokens_seen": 1024, "train_time": 0.75}
    restored = TrainState()
    restored.load_state_dict({"step": 2, "tokens_seen": 1024, "train_time": 0.75})
    assert restored == state


@pytest.mark.parametrize("every,last,expected", [
    (10, 35, [10, 20, 30, 35]),  # every 10 and the last step
    (10, 30, [10, 20, 30]),  # the last step is also a multiple: once
    (1, 3, [1, 2, 3]),
    (0, 30, []),  # 0 turns the action off, the last step included
    (50, 30, [30]),  # longer than the run: only the end
])
def test_due_runs_every_n_steps_and_at_the_last(every, last, expected):
    assert [step for step in range(1, last + 1) if due(step, every, last)] == expected


class FakeEngine:
    def __init__(self, log):
        self.log = log

    def set_gradient_accumulation_boundary(self, is_boundary):
        self.log.append(("boundary", is_boundary))

    def backward(self, loss):
        self.log.append(("engine.backward", float(loss)))

    def step(self):
        self.log.append(("engine.step",))


def fake_accelerator(log, sync: bool, distributed_type=DistributedType.NO, scale=None):
    return SimpleNamespace(
        sync_gradients=sync, distributed_type=distributed_type,
        scaler=None if scale is None else SimpleNamespace(get_scale=lambda: scale),
        backward=lambda loss: log.append(("accelerate.backward", float(loss))),
        deepspeed_engine_wrapped=SimpleNamespace(engine=FakeEngine(log)))


def monitor(log):
    def read(loss_scale=1.0):
        log.append(("norms", loss_scale))
        return {"grad_norm/global": 1.0}
    return read


def test_plain_backward_reads_the_norms_at_the_boundary_with_the_loss_scale_divided_out():
    log = []
    assert Backward(fake_accelerator(log, sync=False), monitor(log))(torch.tensor(2.0)) == {}
    assert Backward(fake_accelerator(log, sync=True, scale=1024.0), monitor(log))(torch.tensor(3.0)) == \
        {"grad_norm/global": 1.0}
    assert log == [("accelerate.backward", 2.0), ("accelerate.backward", 3.0), ("norms", 1024.0)]


def test_deepspeed_backward_reads_the_norms_between_the_engines_backward_and_step():
    log = []
    DeepSpeedBackward(fake_accelerator(log, sync=False), monitor(log))(torch.tensor(2.0))
    norms = DeepSpeedBackward(fake_accelerator(log, sync=True), monitor(log))(torch.tensor(3.0))
    assert norms == {"grad_norm/global": 1.0}
    assert log == [("accelerate.backward", 2.0),  # inside the accumulation: accelerate's path
                   ("boundary", True), ("engine.backward", 3.0), ("norms", 1.0), ("engine.step",)]


def test_deepspeed_backward_without_a_monitor_leaves_the_step_to_accelerate():
    log = []
    assert DeepSpeedBackward(fake_accelerator(log, sync=True))(torch.tensor(1.0)) == {}
    assert log == [("accelerate.backward", 1.0)]


@pytest.mark.parametrize("distributed_type,strategy,sharded", [
    (DistributedType.NO, Backward, None),
    (DistributedType.MULTI_GPU, Backward, None),
    (DistributedType.FSDP, Backward, None),
    (DistributedType.DEEPSPEED, DeepSpeedBackward, "deepspeed"),
])
def test_the_strategy_and_the_monitors_sharding_are_chosen_by_the_engine(distributed_type, strategy, sharded):
    model = torch.nn.Linear(3, 2)
    chosen = make_backward(fake_accelerator([], True, distributed_type), model, monitor=True)
    assert type(chosen) is strategy
    assert chosen.monitor.sharded == sharded
    assert make_backward(fake_accelerator([], True, distributed_type), model, monitor=False).monitor is None
