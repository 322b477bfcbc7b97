"""The run directory, laid out as ms-swift lays it out, and everything rank 0 writes into it.

    output/{ckpt basename}/v{N}-{YYYYMMDD-HHMMSS}/
        args.json                 SftArguments (flat, as swift writes it) + "megatron": the translated arguments
        logging.jsonl             one JSON object per logged step / evaluation (swift's keys where swift has one)
        runs/                     TensorBoard events (--logging_dir overrides)
        images/train_loss.png     loss curve(s), drawn at the end (matplotlib Agg: no display needed)
        iter_0000010/ ... tracker, metadata, tokenizer   (checkpoint.py writes these; names in convert.ckpt_layout)

Only global rank 0 writes; other ranks get a RunLogger with enabled=False whose methods do nothing, so the trainer
never branches on rank. N is the next free version index (max existing + 1), as swift numbers its runs.

Run dirs are created by `create_run_dir`: under an flock on output/{name} and with an exclusive mkdir, so runs
started together never share a dir (nor a version number). The creating process keeps a shared flock on its run dir
while it lives; a run dir that is still empty when its process exits is removed, and one left empty by a killed
process (its flock is gone) is removed by the next run, together with the other runs' provably stale checkpoint
leftovers (`.iter_N.tmp` of a killed save, see megatune.convert.ckpt_layout).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

_VERSION_RE = re.compile(r"^v(\d+)-")


def next_version_dir(output_dir: str | os.PathLike, name: str, now: datetime | None = None) -> Path:
    """`output_dir/name/v{N}-{YYYYMMDD-HHMMSS}` with N one past the largest version already there (not created)."""
    base = Path(output_dir) / name
    versions = [int(m.group(1)) for p in (base.iterdir() if base.is_dir() else ()) if (m := _VERSION_RE.match(p.name))]
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return base / f"v{max(versions, default=-1) + 1}-{stamp}"


_HELD: dict[Path, int] = {}  # run dir -> fd holding its shared flock for this process's lifetime


@contextlib.contextmanager
def _flocked(directory: Path, mode: int) -> Iterator[bool]:
    """Hold flock(mode) on `directory`; yields whether the lock is held (False: taken by another process, with
    LOCK_NB, or a filesystem without flock, where the exclusive mkdir alone keeps runs apart)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, mode)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _hold(run_dir: Path) -> None:
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        pass
    _HELD[run_dir] = fd
    atexit.register(remove_if_empty, run_dir)


def remove_if_empty(run_dir: Path) -> bool:
    """Remove `run_dir` when nothing was written into it (a run that failed before logging anything)."""
    fd = _HELD.pop(Path(run_dir), None)
    if fd is not None:
        os.close(fd)
    try:
        os.rmdir(run_dir)  # refuses a non-empty dir
    except OSError:
        return False
    return True


def clean_stale_runs(base: Path) -> list[Path]:
    """In output/{name}: remove run dirs left empty by a dead process, and the other runs' provably stale
    checkpoint leftovers. Call it holding the exclusive lock on `base` (create_run_dir does)."""
    from megatune.convert.ckpt_layout import clean_stale_leftovers

    removed: list[Path] = []
    for run in sorted(p for p in base.iterdir() if _VERSION_RE.match(p.name) and p.is_dir() and p not in _HELD):
        try:
            empty = not any(run.iterdir())
            if empty:
                with _flocked(run, fcntl.LOCK_EX | fcntl.LOCK_NB) as free:  # its creator holds LOCK_SH while alive
                    if free and not any(run.iterdir()):
                        run.rmdir()
                        removed.append(run)
            else:
                removed += clean_stale_leftovers(run)
        except OSError:  # another user's run, or it went away meanwhile: not ours to clean
            continue
    return removed


def create_run_dir(output_dir: str | os.PathLike, name: str, now: datetime | None = None) -> tuple[Path, str | None]:
    """(`output_dir/name/v{N}-{time}`, None), created for this run alone; or (the path it would have had, a reason
    for one error line) when it cannot be created or written to."""
    base = Path(output_dir) / name
    path = next_version_dir(output_dir, name, now)
    try:
        base.mkdir(parents=True, exist_ok=True)
        with _flocked(base, fcntl.LOCK_EX):
            clean_stale_runs(base)
            for _ in range(1000):
                path = next_version_dir(output_dir, name, now)
                try:
                    path.mkdir()
                except FileExistsError:  # a run without the lock (another host on NFS) took it: the next N
                    continue
                _hold(path)
                break
            else:
                return path, f"could not create a new run dir in {str(base)!r} (1000 attempts)"
    except OSError as e:
        return path, f"output directory {str(base)!r} is not writable ({e.strerror or e})"
    return path, check_writable(path)


def check_writable(path: Path) -> str | None:
    """None when `path` can be created and written to, else a reason suitable for one error line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return f"output directory {str(path)!r} is not writable ({e.strerror or e})"
    return None


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if hasattr(obj, "__dict__") and not callable(obj):  # argparse.Namespace and friends
        return {k: _jsonable(v) for k, v in vars(obj).items()}
    return str(obj)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m}m {s}s" if h else (f"{m}m {s}s" if m else f"{s}s")


class RunLogger:
    """logging.jsonl + TensorBoard + a tqdm bar + the final loss PNG, on rank 0 only."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int = 0, logging_dir: str | None = None,
                 enabled: bool = True, progress: bool = True) -> None:
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.total_steps, self.start_step = total_steps, start_step
        self.history: dict[str, list[tuple[int, float]]] = {"loss": [], "eval_loss": []}
        self._t0 = time.time()
        self._tb = self._bar = self._jsonl = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "logging.jsonl", "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(logging_dir or self.run_dir / "runs"))
        except ImportError:  # tensorboard is a declared dependency; a broken install should not stop training
            print("megatune sft: tensorboard is not importable; TensorBoard events are not written", file=sys.stderr)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="Train", unit="it", dynamic_ncols=True,
                             file=sys.stderr)

    def write_args(self, sft: Any, megatron: Any, extra: dict | None = None) -> None:
        """args.json: swift's flat SftArguments dict, plus the Megatron arguments it was translated to."""
        if not self.enabled:
            return
        body = _jsonable(sft) if sft is not None else {}
        if not isinstance(body, dict):
            body = {"sft": body}
        body["megatron"] = _jsonable(megatron)
        body.update(_jsonable(extra or {}))
        from megatune.convert.ckpt_layout import write_text_atomic  # resume reads args.json: never half written

        write_text_atomic(self.run_dir / "args.json", json.dumps(body, indent=2, ensure_ascii=False) + "\n")

    def _write(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._jsonl.flush()  # a crashed run keeps every line logged so far

    def log_train(self, step: int, metrics: dict[str, Any]) -> None:
        """One training record: swift-style progress keys are added here, scalars also go to TensorBoard."""
        if not self.enabled:
            return
        if metrics.get("loss") is not None:
            self.history["loss"].append((step, float(metrics["loss"])))
        elapsed = time.time() - self._t0
        done = max(step - self.start_step, 1)
        remaining = elapsed / done * max(self.total_steps - step, 0)
        record = {**metrics, "global_step/max_steps": f"{step}/{self.total_steps}",
                  "percentage": f"{100.0 * step / max(self.total_steps, 1):.2f}%",
                  "elapsed_time": _duration(elapsed), "remaining_time": _duration(remaining)}
        self._write(record)
        self._scalars("train", step, metrics)
        if self._bar is not None and metrics.get("loss") is not None:
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics.get('learning_rate', 0):.2e}",
                                  refresh=False)

    def log_eval(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if metrics.get("eval_loss") is not None:
            self.history["eval_loss"].append((step, float(metrics["eval_loss"])))
        self._write({**metrics, "global_step/max_steps": f"{step}/{self.total_steps}"})
        self._scalars("eval", step, {k.removeprefix("eval_"): v for k, v in metrics.items()})
        if self._bar is not None:
            self._bar.write(f"[eval] step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                                               if isinstance(v, float)))

    def _scalars(self, prefix: str, step: int, metrics: dict[str, Any]) -> None:
        if self._tb is None:
            return
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def message(self, text: str) -> None:
        """A line for the user that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def plot(self) -> Path | None:
        """images/train_loss.png (and eval_loss.png when evaluations ran); returns the train curve's path."""
        if not self.enabled or not self.history["loss"]:
            return None
        import matplotlib

        matplotlib.use("Agg")  # headless: no display on training nodes
        import matplotlib.pyplot as plt

        images = self.run_dir / "images"
        images.mkdir(exist_ok=True)
        out = None
        for key in ("loss", "eval_loss"):
            points = self.history[key]
            if not points:
                continue
            fig, ax = plt.subplots(figsize=(8, 5))
            steps, values = zip(*points)
            ax.plot(steps, values, marker="." if len(points) < 50 else None)
            ax.set_xlabel("step")
            ax.set_ylabel(key)
            ax.set_title(f"{'train_' if key == 'loss' else ''}{key}")
            ax.grid(alpha=0.3)
            path = images / f"{'train_' if key == 'loss' else ''}{key}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            out = out or path
        return out

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._bar = self._tb = self._jsonl = None
