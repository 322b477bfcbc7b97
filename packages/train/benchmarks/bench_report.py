"""How the training benchmarks report: two profiled steps summarised (top CUDA kernels, call sites, GPU busy, idle
gaps), one line a row, loss-curve distances (bench_train.py, bench_moe.py, bench_lora.py)."""

from __future__ import annotations


def _device_us(event) -> float:
    """An aggregated profiler event's own device time (torch's name for it changed from `cuda` to `device`)."""
    t = getattr(event, "self_device_time_total", None)
    return getattr(event, "self_cuda_time_total", 0) if t is None else t


def top_kernels(prof, limit: int = 15) -> list[tuple[str, float, int]]:
    rows = []
    for e in prof.key_averages():
        t = _device_us(e)
        if t > 0:
            rows.append((e.key, t / 1e3, e.count))
    return sorted(rows, key=lambda r: -r[1])[:limit]


def call_sites(prof, ops: tuple[str, ...] = ("aten::cat", "aten::add_", "aten::copy_"), limit: int = 3
               ) -> list[tuple[str, float, int, str]]:
    """Where the named aten ops come from (a profile taken with_stack=True): for each op, its `limit` costliest
    Python call sites by device time, as (op, ms, calls, innermost frames of megatune/megatron code)."""
    rows = []
    for e in prof.key_averages(group_by_stack_n=8):
        if e.key not in ops:
            continue
        t = _device_us(e)
        frames = [f for f in (e.stack or []) if "megatron" in f or "megatune" in f] or list(e.stack or [])[:2]
        rows.append((e.key, t / 1e3, e.count, " <- ".join(f.split("/")[-1] for f in frames[:3])))
    out = []
    for op in ops:
        out += sorted((r for r in rows if r[0] == op), key=lambda r: -r[1])[:limit]
    return out


def idle_gaps(kernels: list[tuple[float, float, str]], *, min_us: float = 20.0, limit: int = 8) -> dict:
    """Where the GPU waited: `kernels` are (start_us, end_us, name) of every device activity of a profile (kernels,
    copies, memsets). A gap is time between one activity's end (the latest end so far, so overlapping streams count
    as busy) and the next start, longer than `min_us`. Returns the idle total (ms), the gap count, and the idle summed
    by the activity that followed each gap ("waited for") and by the one that preceded it, largest first: the first
    says which phase the host was late to launch (optimizer, embedding = step start, router ops, ...), the second
    what ran before the host stalled (a synchronising read follows it)."""
    after: dict[str, list[float]] = {}
    before: dict[str, list[float]] = {}
    idle_us, gaps, latest, previous = 0.0, 0, None, None
    for start, end, name in sorted(kernels):
        if latest is not None and start - latest > min_us:
            gap = start - latest
            idle_us, gaps = idle_us + gap, gaps + 1
            after.setdefault(name, []).append(gap)
            before.setdefault(previous, []).append(gap)
        if latest is None or end > latest:
            latest, previous = end, name

    def top(by: dict[str, list[float]]) -> list[tuple[str, float, int]]:
        rows = [(n, sum(g) / 1e3, len(g)) for n, g in by.items()]
        return sorted(rows, key=lambda r: -r[1])[:limit]

    return {"idle_ms": idle_us / 1e3, "gaps": gaps, "after": top(after), "before": top(before)}


def profile_steps(run_two_steps, step_s: float) -> dict:
    """Profile `run_two_steps()` (two training steps on the GPU, with Python stacks) and summarise it: top_kernels,
    call_sites, gpu_busy (kernel time / wall time of the two steps, `step_s` each: one compute stream on 1 GPU) and
    idle gaps. A summary the profiler API cannot give is reported and left out, never losing the others."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    try:  # Python frames on the events (call_sites): torch fills event stacks only in verbose mode
        from torch._C._profiler import _ExperimentalConfig

        verbose = {"experimental_config": _ExperimentalConfig(verbose=True)}
    except (ImportError, TypeError):
        verbose = {}
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True, **verbose) as prof:
        run_two_steps()
        torch.cuda.synchronize()
    out = {"top_kernels": top_kernels(prof)}
    try:
        out["call_sites"] = call_sites(prof)
    except Exception as e:  # noqa: BLE001 - a profiler API difference must not lose the measurement
        print(f"[bench] call sites not computed: {type(e).__name__}: {e}", flush=True)
    try:
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        out["gpu_busy"] = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / (2e3 * step_s)
        out["idle"] = idle_gaps([(e.time_range.start, e.time_range.end, e.name) for e in kernels])
    except Exception as e:  # noqa: BLE001 - a profiler API difference must not lose the measurement
        print(f"[bench] GPU busy / idle gaps not computed: {type(e).__name__}: {e}", flush=True)
    return out


def fmt(r: dict) -> str:
    if r.get("error"):
        return f"{r['name'][:56]:56s} {r.get('gpus', 1):>4} FAILED: {r['error'][:100]}"
    if r.get("oom"):
        more_than = f"> {r['peak_mem_gb']:.0f}"
        return f"{r['name'][:56]:56s} {r.get('gpus', 1):>4} {'OOM':>10} {'-':>7} {more_than:>8}"
    return (f"{r['name'][:56]:56s} {r.get('gpus', 1):>4} {r['tokens_per_s']:>10.0f} {100 * r['mfu']:>6.1f}% "
            f"{r['peak_mem_gb']:>8.1f}")


def print_rows(rows: list[dict]) -> None:
    """The profiled rows' top CUDA kernels, then one line a row (fmt)."""
    for r in rows:
        if r.get("top_kernels"):
            print(f"\ntop CUDA kernels, {r['name']}, 2 profiled steps (ms total, calls; step "
                  f"{1e3 * r['step_s']:.0f} ms, GPU busy {100 * r.get('gpu_busy', 0):.1f}%):")
            for name, ms, count in r["top_kernels"]:
                print(f"  {ms:9.1f} {count:6d}  {name[:110]}")
            for op, ms, count, where in r.get("call_sites") or []:
                print(f"  {ms:9.1f} {count:6d}  {op} from {where[:150]}")
            idle = r.get("idle")
            if idle:
                print(f"  GPU idle {idle['idle_ms']:.1f} ms in {idle['gaps']} gaps (> 20 us); summed by the activity "
                      f"the GPU then waited for / that ran before the gap:")
                for label, gaps in (("waited for", idle["after"]), ("after", idle["before"])):
                    for name, ms, count in gaps:
                        print(f"  {ms:9.1f} {count:6d}  {label} {str(name)[:100]}")
    print(f"\n{'run':56s} {'gpus':>4} {'tokens/s':>10} {'MFU':>7} {'peak GB':>8}")
    for r in rows:
        print(fmt(r))


def print_curves(rows: list[dict]) -> None:
    """Each row's loss curve against the first row's: relative difference per step (max over all steps, mean over
    the last quarter), and the first/last losses."""
    ref = rows[0]["losses"]
    print(f"\nloss curves, {len(ref)} steps, against {rows[0]['name']} (relative difference |l - ref| / ref):")
    for r in rows:
        rel = [abs(x - y) / y for x, y in zip(r["losses"], ref)]
        tail = rel[-max(len(rel) // 4, 1):]
        print(f"  {r['name'][:56]:56s} first {r['losses'][0]:.3f} last {r['losses'][-1]:.4f}  max {max(rel):.2%}  "
              f"last-quarter mean {sum(tail) / len(tail):.2%}")
