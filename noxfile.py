"""The single entry point: `nox -s tests` runs every package's tests and the end-to-end test; `nox -s demo`
runs the whole pipeline on the built-in tiny model. Benchmarks and GPU sessions are opt-in (default=False).

torch is pinned to the CPU build that pip can take locally (`torch==2.13.0`); installing it first keeps any
dependency from pulling a multi-GB CUDA build on a CPU machine. Set MEGATUNE_TORCH to override the spec.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

PACKAGES = ["convert", "argmap", "train", "evaluate"]
TORCH = os.environ.get("MEGATUNE_TORCH", "torch==2.13.0")
NEEDS_TORCH = {"convert", "train", "evaluate", "e2e"}
# editable installs of siblings, so a package's tests run against this checkout's neighbours, not PyPI's
SIBLINGS = {
    "convert": ["packages/convert[test]"],
    "argmap": ["packages/argmap[test]"],
    "train": ["packages/convert[testing]", "packages/argmap", "packages/train[test]"],
    "evaluate": ["packages/convert[testing]", "packages/argmap", "packages/evaluate[test]"],
    "e2e": [
        "packages/convert[testing]",
        "packages/argmap",
        "packages/train",
        "packages/evaluate",
        ".[test]",
    ],
}


def _install(session: nox.Session, target: str) -> None:
    """Installs without byte-compiling (pip's compileall of torch + transformers + megatron-core is most of a fresh
    virtualenv's install time: 76 s -> 29 s for torch and transformers on the 2-core CI machine); Python then
    writes .pyc files for the modules it imports, once, so PYTHONDONTWRITEBYTECODE (set on these machines) is
    unset for the session: with it and no .pyc, `import torch, transformers` took 17 s instead of 7 s."""
    session.env["PYTHONDONTWRITEBYTECODE"] = None  # nox drops None-valued variables from the commands' environment
    if target in NEEDS_TORCH:
        session.install("--no-compile", TORCH)
    for spec in SIBLINGS[target]:
        session.install("--no-compile", "-e", spec)


def _pytest(session: nox.Session, path: str, *extra: str) -> None:
    session.run("pytest", path, "-q", "-p", "no:cacheprovider", "--timeout=1800", "--durations=8", *extra,
                *session.posargs)


def _workers() -> list[str]:
    """pytest-xdist flags for a package's tests: one worker per core up to 4, each test file on one worker (its
    module fixtures, such as a trained group of ranks, run once). Measured on the 2-core CI machine, serial -> 2
    workers: train 14:01 -> 9:31, convert 75 s -> 59 s, evaluate 62 s -> 56 s, argmap 7.8 s -> 6.2 s; the
    end-to-end test keeps one (8:34 -> 8:27: its 2-4 process runs already fill the cores)."""
    n = min(4, os.cpu_count() or 1)
    return ["-n", str(n), "--dist", "loadfile"] if n > 1 else []


@nox.session
@nox.parametrize("package", [*PACKAGES, "e2e"])
def tests(session: nox.Session, package: str) -> None:
    """Each package alone with only its own test extra, then the cross-package end-to-end test."""
    _install(session, package)
    if package == "e2e":
        _pytest(session, "tests/e2e")
    else:
        _pytest(session, f"packages/{package}/tests", *_workers())


@nox.session
def e2e(session: nox.Session) -> None:
    """The ms-swift Megatron workflow end to end on a tiny model (CPU: 4 gloo processes)."""
    _install(session, "e2e")
    _pytest(session, "tests/e2e")


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def demo(session: nox.Session) -> None:
    """The whole pipeline (export -> sft -> export -> infer -> eval) on the built-in tiny model."""
    _install(session, "e2e")
    session.run("megatune", "demo", *session.posargs)


@nox.session(default=False, venv_backend="none")
def gpu(session: nox.Session) -> None:
    """GPU machine: `pytest -m gpu` over the packages, then a short `megatune sft` in the production configuration
    (bf16, distributed optimizer, overlapped reduce with NPROC_PER_NODE = visible GPUs when >= 2, save, resume).
    Runs in the invoking interpreter (its CUDA torch, not the CPU pin above) on this checkout's sources; the body is
    a plain script, `python packages/train/benchmarks/gpu_check.py`, for machines without nox."""
    session.run("python", "packages/train/benchmarks/gpu_check.py", *session.posargs, external=True)


@nox.session(default=False)
def bench_convert(session: nox.Session) -> None:
    """7B-shaped random bf16 checkpoint: HF -> tp2 -> HF, GB/s next to `cp`, peak RSS."""
    _install(session, "convert")
    session.run("python", "packages/convert/benchmarks/bench_convert.py", *session.posargs)


@nox.session(default=False)
def bench_eval(session: nox.Session) -> None:
    """Loglikelihood items/s of the pt engine (batched) vs one item per forward."""
    _install(session, "evaluate")
    session.run("python", "packages/evaluate/benchmarks/bench_eval.py", *session.posargs)


@nox.session(default=False)
def bench_train(session: nox.Session) -> None:
    """GPU: HF Trainer-style loop vs megatune on the same shape; tokens/s, MFU, peak memory."""
    _install(session, "train")
    session.run("python", "packages/train/benchmarks/bench_train.py", *session.posargs)
