"""Pure unit tests (no processes): torchrun re-launch command, run-dir naming, logging files, MFU arithmetic."""

from __future__ import annotations

import json
import sys
from datetime import datetime

import pytest
from megatune.train import launch, metrics
from megatune.train.rundir import RunLogger, check_writable, next_version_dir


def test_relaunch_only_when_asked_and_not_already_under_torchrun():
    assert not launch.should_relaunch({})
    assert launch.should_relaunch({"NPROC_PER_NODE": "2"})
    assert launch.should_relaunch({"NNODES": "2"})
    assert not launch.should_relaunch({"NPROC_PER_NODE": "2", "LOCAL_RANK": "0"})


def test_torchrun_command_carries_swift_variables():
    env = {"NPROC_PER_NODE": "4", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29501"}
    cmd = launch.torchrun_command(["--dataset", "x.jsonl"], env)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    flags = dict(zip(cmd[3:-4:2], cmd[4:-4:2]))
    assert flags == {"--nproc_per_node": "4", "--nnodes": "2", "--node_rank": "1", "--master_addr": "10.0.0.1",
                     "--master_port": "29501"}
    assert cmd[-4:] == ["-m", "megatune.train.cli", "--dataset", "x.jsonl"]


def test_nproc_defaults_to_visible_gpus():
    cmd = launch.torchrun_command([], {"NNODES": "1", "CUDA_VISIBLE_DEVICES": "0,2,3"})
    assert cmd[cmd.index("--nproc_per_node") + 1] == "3"


def test_version_dirs_count_up(tmp_path):
    now = datetime(2024, 5, 6, 7, 8, 9)
    first = next_version_dir(tmp_path, "qwen2-tp1-pp1", now)
    assert first.name == "v0-20240506-070809"
    first.mkdir(parents=True)
    (tmp_path / "qwen2-tp1-pp1" / "v7-20240101-000000").mkdir()
    assert next_version_dir(tmp_path, "qwen2-tp1-pp1", now).name == "v8-20240506-070809"


def test_unwritable_output_dir_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    reason = check_writable(blocker / "sub")
    assert reason and "not writable" in reason
    assert check_writable(tmp_path / "ok") is None


def test_run_logger_writes_jsonl_args_tensorboard_png(tmp_path):
    log = RunLogger(tmp_path, total_steps=3, progress=False)
    log.write_args({"learning_rate": 1e-4}, {"lr": 1e-4, "nan": float("nan")})
    for step, loss in enumerate([3.0, 2.0, 1.0], 1):
        log.log_train(step, {"loss": loss, "learning_rate": 1e-4, "mfu": None})
    log.log_eval(3, {"eval_loss": 1.5})
    png = log.plot()
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "logging.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in rows[:3]] == [3.0, 2.0, 1.0] and rows[3]["eval_loss"] == 1.5
    assert rows[2]["global_step/max_steps"] == "3/3"
    args = json.loads((tmp_path / "args.json").read_text())
    assert args["learning_rate"] == 1e-4 and args["megatron"]["lr"] == 1e-4
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "images" / "eval_loss.png").exists()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "runs").iterdir())


def test_disabled_logger_writes_nothing(tmp_path):
    log = RunLogger(tmp_path / "r", total_steps=1, enabled=False)
    log.log_train(1, {"loss": 1.0})
    assert log.plot() is None
    log.close()
    assert not (tmp_path / "r").exists()


def test_flops_and_mfu_formula():
    cfg = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
           "intermediate_size": 128, "vocab_size": 1000, "tie_word_embeddings": False}
    n = metrics.count_parameters(cfg)
    # embeddings + output + 4 * (qkv + o + mlp + 2 norms) + final norm
    assert n == 2 * 1000 * 64 + 4 * (64 * (8 + 4) * 8 + 64 * 64 + 3 * 64 * 128 + 128) + 64
    # the untied input embedding is a lookup, not a matmul: it is not in N
    assert metrics.flops_per_token(cfg, 32) == 6 * (n - 1000 * 64) + 12 * 4 * 64 * 32
    tied = {**cfg, "tie_word_embeddings": True}
    assert metrics.flops_per_token(tied, 32) == 6 * metrics.count_parameters(tied) + 12 * 4 * 64 * 32
    out = metrics.throughput(tokens=1000, seconds=2.0, world_size=2, flops_token=1e9, peak=1e12)
    assert out["tokens_per_sec"] == 500.0 and out["mfu"] == pytest.approx(0.25)
    assert metrics.throughput(tokens=1, seconds=1, world_size=1, flops_token=1, peak=None)["mfu"] is None


def test_failure_line_names_the_first_failed_rank():
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    def failure(rank, code):
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="")

    killed = {1: failure(1, -9), 0: failure(0, -15)}  # rank 1 died first; the agent then stopped rank 0
    line, code = launch._failure_line(killed)
    assert code == 1 and line.startswith("rank 1 (pid 101) was killed by SIGKILL")
    peer = {0: failure(0, launch.PEER_LOST_EXIT), 1: failure(1, -11)}  # the survivor noticed first: still rank 1
    assert launch._failure_line(peer)[0].startswith("rank 1 (pid 101) was killed by SIGSEGV")
    assert launch._failure_line({0: failure(0, 1), 1: failure(1, -15)}) == (None, 1)  # rank 0 printed its error
    assert launch._failure_line({0: failure(0, 3)}) == ("rank 0 (pid 100) exited with code 3; the other ranks were "
                                                        "stopped", 1)
    assert "lost its connection" in launch._failure_line({0: failure(0, launch.PEER_LOST_EXIT)})[0]


def test_relaunch_runs_ranks_through_the_launch_module():
    cmd = launch.torchrun_command(["--dataset", "x.jsonl"], {"NPROC_PER_NODE": "2"}, module="megatune.train.launch",
                                  quiet=True)
    assert cmd[2] == "megatune.train.launch" and cmd[-4:-2] == ["-m", "megatune.train.launch"]
