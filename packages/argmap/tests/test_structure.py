"""argmap's module graph has no cycle (function-level imports included), and the resolved-path/new-row rules."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import megatune.argmap as argmap_pkg
from megatune.argmap import SftArguments, derive, to_megatron
from megatune.argmap.mapping import batch_sizes, default_checkpoint

SRC = Path(argmap_pkg.__file__).parent


def imports_of(path: Path) -> set[str]:
    """Sibling modules `path` imports anywhere (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.add(node.module or "__init__")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatune.argmap."):
            out.add(node.module.rsplit(".", 1)[1])
    return out


def test_module_graph_has_no_cycle() -> None:
    graph = {p.stem: imports_of(p) - {"__init__"} for p in SRC.glob("*.py") if p.stem != "__init__"}
    assert graph["sft"].isdisjoint({"mapping", "parse"}), graph["sft"]
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        assert state.get(node) != "open", f"import cycle: {' -> '.join(path + [node])}"
        if state.get(node) == "done":
            return
        state[node] = "open"
        for dep in graph.get(node, ()):
            visit(dep, path + [node])
        state[node] = "done"

    for module in graph:
        visit(module, [])


def test_default_checkpoint_is_named_by_the_table_not_stored_in_the_arguments() -> None:
    sft = SftArguments(model_type="qwen2-7b", tp=2)
    assert sft.resume_from_checkpoint is None  # "not given" stays visible to whoever resolves the source
    assert default_checkpoint(sft) == "qwen2-7b-tp2-pp1" and default_checkpoint(SftArguments()) is None
    meg = to_megatron(sft, world_size=2, train_len=10, val_len=0)
    assert meg.load == "qwen2-7b-tp2-pp1" and meg.save == "output" and meg.tensorboard_dir == "output/runs"


def test_resolved_paths_replace_the_arguments_own() -> None:
    sft = SftArguments(model_type="qwen2-7b", output_dir="out")
    meg = to_megatron(sft, world_size=1, train_len=10, val_len=0, load="/ckpt/x", save="out/x/v0-1")
    assert (meg.load, meg.save, meg.tensorboard_dir) == ("/ckpt/x", "out/x/v0-1", "out/x/v0-1/runs")
    explicit = SftArguments(output_dir="out", logging_dir="tb")
    assert to_megatron(explicit, world_size=1, train_len=10, val_len=0, save="out/v0").tensorboard_dir == "tb"


def test_batch_sizes_are_the_data_independent_part_of_derive() -> None:
    sft = SftArguments(tp=2, batch_size=2, gradient_accumulation_steps=None)
    sizes = batch_sizes(sft, world_size=8)
    assert tuple(derive(sft, world_size=8, train_len=1000, val_len=5)[:4]) == tuple(sizes)
    assert sizes.global_batch_size == 16 and sizes.data_parallel_size == 4


def test_every_value_the_optimizer_reads_is_defined() -> None:
    meg = to_megatron(SftArguments(lr_scheduler_type="warmup_stable_decay", fp16=True), world_size=1,
                      train_len=95, val_len=0)
    assert meg.train_iters == 6 and meg.lr_wsd_decay_iters == math.ceil(6 * 0.1) and meg.lr_wsd_decay_style == "cosine"
    assert (meg.loss_scale, meg.initial_loss_scale, meg.lr_warmup_init) == (None, 2.0**16, 0.0)
    assert to_megatron(SftArguments(), world_size=1, train_len=9, val_len=0).lr_wsd_decay_iters is None


def test_transformer_impl_uses_megatron_lm_names_both_ways() -> None:
    from megatune.argmap import from_megatron

    for ours, theirs in (("native", "local"), ("te", "transformer_engine")):
        meg = to_megatron(SftArguments(transformer_impl=ours), world_size=1, train_len=9, val_len=0)
        assert meg.transformer_impl == theirs and from_megatron(meg)["transformer_impl"] == ours
