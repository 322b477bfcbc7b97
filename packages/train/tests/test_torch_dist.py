"""torch_dist checkpoints (megatron-core dist_checkpointing) on CPU over gloo:

0. an `export --ckpt_format torch_dist` (written at tp1) loads at tp2 x pp2 into the weights of the HF model;
1. a run saved at (tp, pp, dp) = (2, 1, 2) resumes at (1, 2, 2) and (1, 1, 4) with the losses of the uninterrupted
   run (model, optimizer, scheduler and data position resharded), all in one group of 4 processes;
2. --save_safetensors: the HF dir written by the training ranks equals `export --to_hf` of the same checkpoint,
   tensor for tensor, for torch_dist and for the legacy format at tp2 x pp2;
3. `export --ckpt_format torch_dist` and back: byte-identical HF tensors for every tiny architecture;
4. loading never unpickles what is not allow-listed (`.metadata`, common.pt).

The ranks are spawned as non-daemon processes: megatron-core's torch_dist writer forks its own writer processes,
which a daemon process may not do (distributed.run_local's children are daemons).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
from group_helpers import as_rank as _as_rank
from group_helpers import rewind, sft_argv
from megatune.train.distributed import free_port
from safetensors.torch import load_file

STEPS, SAVE_AT = 8, 4
RESUMED = [(1, 2, 2), (1, 1, 4)]


def _entry(rank, world, port, results, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        out = (True, fn(rank, world, *args))
    except BaseException:  # noqa: BLE001 - back to the parent
        out = (False, traceback.format_exc())
    Path(results, f"{rank}.pkl").write_bytes(pickle.dumps(out))


def spawn(world: int, fn, *args) -> list:
    """fn(rank, world, *args) in `world` non-daemon processes; results by rank (a failure re-raised here)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as results:
        mp.spawn(_entry, args=(world, free_port(), results, fn, args), nprocs=world, join=True)
        out = [pickle.loads(Path(results, f"{r}.pkl").read_bytes()) for r in range(world)]
    for r, (ok, value) in enumerate(out):
        if not ok:
            raise RuntimeError(f"rank {r} of {world} failed:\n{value}")
    return [value for _, value in out]


def _same_weights(model_dir: str, exported: str) -> list[str]:
    """An exported torch_dist dir loads at tp2 x pp2 into the weights the HF dir loads into (names that differ)."""
    from megatune.train import distributed
    from megatune.train.checkpoint import load_pretrained
    from megatune.train.model import build_model

    distributed.init_distributed(2, 2)
    [a], [b] = build_model(model_dir, tp=2, pp=2), build_model(model_dir, tp=2, pp=2)
    load_pretrained([a], model_dir)
    load_pretrained([b], exported)
    sa, sb = a.state_dict(), b.state_dict()
    bad = [k for k in sa if torch.is_tensor(sa[k]) and not torch.equal(sa[k], sb[k])]
    distributed.destroy()
    return bad


def _group(rank: int, world: int, model_dir: str, out_dir: str, ports: list[int], exported: str) -> dict:
    from megatune.train import cli

    differ = _same_weights(model_dir, exported)
    _as_rank(rank, world, ports[-2])
    flags = dict(max_steps=STEPS, save_steps=SAVE_AT, ckpt_format="torch_dist", save_safetensors="true")
    res = cli.run(sft_argv(model_dir, out_dir, tp=2, pp=1, **flags), progress=False)
    results = {"base": {k: res[k] for k in ("losses", "run_dir", "last_saved")}, "differ": differ}
    run_dir = res["run_dir"]
    rewind(rank, out_dir, [run_dir], SAVE_AT)  # a crash after the save of SAVE_AT: the tracker points there
    for (tp, pp, dp), port in zip(RESUMED, ports):
        _as_rank(rank, tp * pp * dp, port)
        res = cli.run(sft_argv(model_dir, out_dir, tp=tp, pp=pp, resume_from_checkpoint=run_dir, **flags),
                      progress=False)
        results[(tp, pp, dp)] = {k: res[k] for k in ("losses", "start_iteration", "tp", "pp", "dp", "run_dir")}
    _as_rank(rank, 4, ports[-1])  # the legacy format at tp2 x pp2 with --save_safetensors
    res = cli.run(sft_argv(model_dir, out_dir, tp=2, pp=2, max_steps=2, save_steps=2, save_safetensors="true"),
                  progress=False)
    results["legacy"] = res["run_dir"]
    return results


@pytest.fixture(scope="module")
def group(tiny_qwen2, tmp_path_factory):
    from megatune.convert.cli import main

    out = tmp_path_factory.mktemp("runs")
    exported = out / "exported"
    assert main(["--model_id_or_path", str(tiny_qwen2), "--to_megatron", "true", "--megatron_output_dir",
                 str(exported), "--ckpt_format", "torch_dist"]) == 0
    ports = [free_port() for _ in range(len(RESUMED) + 2)]
    return spawn(4, _group, str(tiny_qwen2), str(out), ports, str(exported))[0]


@pytest.mark.slow
def test_exported_torch_dist_loads_at_another_layout(group):
    assert group["differ"] == [], f"tp2 x pp2 weights from the tp1 export differ from HF's: {group['differ']}"


def load_hf(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)), k


@pytest.mark.slow
@pytest.mark.parametrize("layout", RESUMED)
def test_resume_at_another_layout_continues_the_loss_curve(group, layout):
    base, resumed = group["base"], group[layout]
    assert len(base["losses"]) == STEPS and base["last_saved"] == STEPS
    assert (resumed["tp"], resumed["pp"], resumed["dp"], resumed["start_iteration"]) == (*layout, SAVE_AT)
    want, got = base["losses"][SAVE_AT:], resumed["losses"]
    assert len(got) == STEPS - SAVE_AT
    diff = max(abs(a - b) for a, b in zip(got, want))
    assert diff <= 1e-5, f"{layout}: max |loss diff| {diff:.2e} vs the uninterrupted run: {got} vs {want}"
    assert (Path(resumed["run_dir"]) / "iter_0000008" / "metadata.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["base", "legacy"])
def test_save_safetensors_equals_export(group, kind, tmp_path):
    from megatune.convert.cli import main

    run_dir = Path(group[kind]["run_dir"] if kind == "base" else group[kind])
    iteration = f"iter_{SAVE_AT:07d}" if kind == "base" else "iter_0000002"  # the latest (base: rewound)
    streamed = run_dir / iteration / "qwen2-hf"
    assert main(["--ckpt_dir", str(run_dir), "--to_hf", "true", "--hf_output_dir", str(tmp_path / "hf")]) == 0
    exported = load_hf(tmp_path / "hf")
    assert_identical(exported, load_hf(streamed))
    assert (streamed / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()
    assert (streamed / "config.json").read_text() == (tmp_path / "hf" / "config.json").read_text()


@pytest.mark.parametrize("arch", ["llama3", "qwen2", "qwen3", "qwen2_moe"])
def test_export_round_trip_is_byte_identical(tmp_path, arch):
    from megatune.convert.cli import main
    from megatune.convert.testing import make_tiny_model

    hf = make_tiny_model(arch, tmp_path / arch, seed=1)
    meg = tmp_path / "td"
    assert main(["--model_id_or_path", str(hf), "--to_megatron", "true", "--megatron_output_dir", str(meg),
                 "--tp", "2", "--ckpt_format", "torch_dist"]) == 0
    assert (meg / "release" / "metadata.json").is_file() and (meg / "release" / "common.pt").is_file()
    assert "--ckpt-format torch_dist" in (meg / "megatron_args.sh").read_text()
    assert main(["--ckpt_dir", str(meg), "--to_hf", "true"]) == 0
    assert_identical(load_hf(hf), load_hf(meg / f"{arch}-hf"))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("victim", [".metadata", "common.pt"])
def test_loading_refuses_objects_outside_the_allow_list(tmp_path, victim, capsys):
    from megatune.convert.cli import main
    from megatune.convert.testing import make_tiny_model

    hf = make_tiny_model("qwen2", tmp_path / "hf")
    meg = tmp_path / "td"
    assert main(["--model_id_or_path", str(hf), "--to_megatron", "true", "--megatron_output_dir", str(meg),
                 "--ckpt_format", "torch_dist"]) == 0
    marker = tmp_path / "pwned"
    path = meg / "release" / victim
    if victim == ".metadata":
        path.write_bytes(pickle.dumps(_Payload(marker)))
    else:
        torch.save({"args": _Payload(marker)}, path)
    capsys.readouterr()
    assert main(["--ckpt_dir", str(meg), "--to_hf", "true"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert not marker.exists(), "the checkpoint's pickle ran code"
    assert len(err) == 1 and str(meg / "release") in err[0] and "allow" in err[0], err
