"""The training loop: step, log, evaluate, checkpoint — nothing else.

Everything the loop needs (the plan, model chunks wrapped in megatron-core DDP, optimizer, scheduler, batch
iterators, run logger, the checkpoint format and the states it saves) is built by `runtime.py` and handed over as a
`Run`. The loop itself is deliberately plain:

    for it in range(start, train_iters):
        loss = train_step(next(train_batches))        # one global batch = G micro-batches on each DP rank
        log every log_interval; evaluate every eval_interval; save every save_interval (and at the end)

A checkpoint holds the `states` mapping (model, optimizer, scheduler, data position, RNG; states.py), so a resumed
run draws exactly the batches the original would have drawn next with the same optimizer, schedule and random
streams: resume is bit-exact on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from megatune.train import metrics, steps
from megatune.train.errors import TrainError
from megatune.train.optim import current_lr, scheduler_increment
from megatune.train.plan import TrainingPlan
from megatune.train.rundir import RunLogger
from megatune.train.states import CheckpointFormat, Stateful

# test hook: sleep this many seconds inside every checkpoint save (lets a test SIGKILL a run mid-save)
SAVE_SLEEP_ENV = "MEGATUNE_TEST_SAVE_SLEEP"


@dataclasses.dataclass
class Run:
    """Everything the loop touches. Built by runtime.build_run()."""

    plan: TrainingPlan
    model: list  # DDP-wrapped model chunks of this rank
    optimizer: Any
    scheduler: Any
    train_batches: Any  # BatchIterator: next() -> list of micro-batch dicts; state_dict()/load_state_dict()
    make_val_batches: Callable[[], Any] | None  # fresh validation iterator per evaluation, or None
    forward_step: Callable
    logger: RunLogger
    checkpoint: CheckpointFormat | None  # where checkpoints go (the run dir); None: do not save
    save_states: dict[str, Stateful]  # what a checkpoint holds (model and data only with --save_only_model)
    device: torch.device
    start_iteration: int = 0
    is_rank0: bool = True

    @property
    def args(self):  # MegatronArguments: intervals and iteration counts in Megatron-LM's names
        return self.plan.megatron


def _global_tokens(microbatches: list[dict], device: torch.device) -> int:
    """Tokens (prompt + response, padding excluded) of the whole global batch, summed over DP ranks."""
    from megatron.core import parallel_state as ps

    local = 0
    for mb in microbatches:  # document_ids is -1 on padding
        doc = mb.get("document_ids")
        local += int((doc >= 0).sum()) if doc is not None else int(mb["tokens"].numel())
    if ps.get_data_parallel_world_size() == 1:
        return local
    t = torch.tensor([local], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
    return int(t.item())


def evaluate(run: Run) -> float | None:
    """Mean CE over the loss tokens of `eval_iters` validation batches (all of them when it runs out first)."""
    if run.make_val_batches is None:
        return None
    total, count = 0.0, 0
    batches = run.make_val_batches()
    for i, microbatches in enumerate(batches):
        if i >= int(run.args.eval_iters or 0):
            break
        loss_sum, tokens = steps.eval_step(run.model, microbatches, run.forward_step, device=run.device)
        total, count = total + loss_sum, count + tokens
    return total / count if count else None


def save(run: Run, iteration: int) -> None:
    run.logger.message(f"saving checkpoint at iteration {iteration} to {run.checkpoint.directory}")
    with _slow_saves(iteration):
        run.checkpoint.save(run.save_states, iteration)


@contextlib.contextmanager
def _slow_saves(iteration: int):
    """Test hook (MEGATUNE_TEST_SAVE_SLEEP=seconds[@iteration]): pause after every torch.save inside a checkpoint save, so a
    crash-safety test can SIGKILL the process while a checkpoint is half written."""
    spec = os.environ.get(SAVE_SLEEP_ENV, "")
    seconds, _, only_at = spec.partition("@")  # "30" every save, "30@10" only when saving iteration 10
    sleep = float(seconds or 0)
    if sleep <= 0 or (only_at and int(only_at) != iteration):
        yield
        return
    real_save = torch.save

    def save_then_sleep(*a, **k):
        real_save(*a, **k)
        print(f"megatune-test: in checkpoint save of iteration {iteration}, sleeping {sleep}s", flush=True)
        time.sleep(sleep)

    torch.save = save_then_sleep
    try:
        yield
    finally:
        torch.save = real_save


def stop_if_not_finite(iteration: int, out: dict) -> None:
    """Megatron-LM's NaN check: a non-finite loss or grad norm stops the run before NaN weights are saved. The loss
    and grad norm are all-reduced, so every rank sees the same values and stops here together."""
    bad = [f"{name.replace('_', ' ')} {float(out[name])}" for name in ("loss", "grad_norm")
           if out.get(name) is not None and not math.isfinite(float(out[name]))]
    if bad:
        raise TrainError(f"iteration {iteration}: {' and '.join(bad)}; stopped without saving it (the last checkpoint "
                         f"is kept); lower --learning_rate, or check the data and the starting weights for NaN/Inf")


def train(run: Run) -> dict[str, Any]:
    """Run iterations start_iteration+1 .. train_iters; returns {"losses": [...], "eval_losses": [...], ...}."""
    args = run.args
    train_iters = int(args.train_iters)
    log_interval = max(int(args.log_interval or 1), 1)
    eval_interval = int(args.eval_interval or 0)
    save_interval = int(args.save_interval or 0)
    increment = scheduler_increment(args)
    peak = metrics.device_peak_flops(run.plan.policy.params_dtype)
    world_size, hf_config = run.plan.parallel.world_size, run.plan.source.hf_config
    for chunk in run.model:
        chunk.train()

    losses: list[float] = []
    eval_losses: list[tuple[int, float]] = []
    window = {"loss_sum": 0.0, "steps": 0, "tokens": 0, "seconds": 0.0, "seq": 0}
    iteration = run.start_iteration
    last_saved = None
    while iteration < train_iters:
        microbatches = next(run.train_batches)
        t0 = time.perf_counter()
        out = steps.train_step(run.model, run.optimizer, run.scheduler, microbatches, run.forward_step,
                               increment=increment, device=run.device)
        seconds = time.perf_counter() - t0
        iteration += 1
        stop_if_not_finite(iteration, out)
        losses.append(out["loss"])
        window["loss_sum"] += out["loss"]
        window["steps"] += 1
        window["tokens"] += _global_tokens(microbatches, run.device)
        window["seconds"] += seconds
        window["seq"] = max(window["seq"], int(microbatches[0]["tokens"].shape[1]))
        run.logger.advance()

        if iteration % log_interval == 0 or iteration == train_iters:
            grad_norm = out["grad_norm"]
            record = {
                "loss": round(window["loss_sum"] / window["steps"], 6),
                "grad_norm": None if grad_norm is None else round(float(grad_norm), 6),
                "learning_rate": current_lr(run.optimizer),
                **metrics.throughput(tokens=window["tokens"], seconds=window["seconds"], world_size=world_size,
                                     flops_token=metrics.flops_per_token(hf_config, window["seq"]), peak=peak),
                "memory(GiB)": round(metrics.memory_gib(), 3),
                "global_step": iteration,
            }
            if out["skipped"]:
                record["skipped_iter"] = True
            # MoE: this step's aux loss / z-loss and expert load (tokens per expert, max and mean over experts)
            record.update({k: round(v, 6) for k, v in out.get("moe", {}).items()})
            run.logger.log_train(iteration, record)
            window = {"loss_sum": 0.0, "steps": 0, "tokens": 0, "seconds": 0.0, "seq": 0}

        if eval_interval and (iteration % eval_interval == 0 or iteration == train_iters):
            eval_loss = evaluate(run)
            if eval_loss is not None:
                eval_losses.append((iteration, eval_loss))
                run.logger.log_eval(iteration, {"eval_loss": round(eval_loss, 6), "global_step": iteration})

        if run.checkpoint is not None and (iteration == train_iters or (save_interval and iteration % save_interval == 0)):
            save(run, iteration)
            last_saved = iteration
        if run.checkpoint is not None:
            run.checkpoint.finalize()  # an asynchronous save whose write has finished is published

    if run.checkpoint is not None:
        run.checkpoint.finalize(blocking=True)
    run.logger.plot()
    return {"losses": losses, "eval_losses": eval_losses, "iteration": iteration, "last_saved": last_saved}
