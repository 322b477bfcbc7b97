"""CPU mode: run real megatron-core (0.16.1 ... <0.20) on the CPU over gloo, for tests and CUDA-less machines.

megatron-core assumes CUDA in a handful of places. `enable()` points exactly those at the CPU and nothing else;
it is a no-op whenever `torch.cuda.is_available()` (so it can never change GPU behaviour) and idempotent.

What is patched, and why (each would raise "Torch not compiled with CUDA" / "no CUDA GPUs" otherwise):

1. `torch.cuda.current_device()` -> `torch.device("cpu")`. Used as the `device=` of buffers all over megatron-core
   (tensor_parallel.layers / mappings / utils: SP all-gather buffers and grad buffers; pipeline_parallel.
   p2p_communication: shape and activation buffers; distributed.param_and_grad_buffer; optimizer loss scale).
   `torch.cuda.synchronize()` -> no-op (p2p_communication after batched isend/irecv, parallel_state barriers).
   Only functions that would raise without CUDA are replaced, so other libraries see no change in behaviour.
2. RNG tracker (`tensor_parallel.random`): `CudaRNGStatesTracker.add/fork` read and write the CUDA generator via
   `torch.cuda.get_rng_state` / `_set_cuda_rng_state`. We substitute a subclass that keeps the named states of the
   CPU generator (the device generator in CPU mode), and point `_get_cuda_rng_state` / `_set_cuda_rng_state`
   (used by activation recompute's `CheckpointFunction`) at the CPU generator. Dropout under
   `get_cuda_rng_tracker().fork()` then differs per TP rank exactly as on GPU.
3. Literal `device="cuda"` factory calls and `Tensor.cuda()` run under a scoped `TorchFunctionMode` that rewrites
   them to the CPU (and drops `pin_memory`), active only inside these functions:
   - `pipeline_parallel.schedules.forward_backward_*` (`total_num_tokens = torch.zeros(..., device="cuda")`);
   - `LanguageModule.setup_embeddings_and_output_layer` (`weight.data.cuda()` when tied embeddings span PP stages);
   - `optimizer.clip_grads.get_grad_norm_fp32` / `count_zeros_fp32` (+ `utils.local_multi_tensor_l2_norm` inside);
   - `FP32Optimizer.__init__` (`self._scale = torch.tensor(..., device="cuda")`);
   - `tensor_parallel.data.broadcast_data`.
4. Explicit causal mask: `transformer.utils.get_default_causal_mask` / `get_sliding_window_causal_mask` build the
   mask with `device="cuda"`; `fusions.fused_softmax` (the local spec's unfused softmax path) gets CPU versions.
5. Gradient clipping: `optimizer.clip_grads.clip_grad_by_total_norm_fp32` asserts
   `param.grad.type() == "torch.cuda.FloatTensor"` and scales through `multi_tensor_applier`; replaced (also where
   `optimizer.optimizer` imported it by name) by the same math on CPU tensors.

Not supported on CPU (GPU-only, callers must refuse them in CPU mode): the distributed optimizer (CUDA tensor-type
checks; gloo has no reduce_scatter) and the bf16/fp16 optimizer wrappers (`Float16OptimizerWithFloat16Params`
checks `torch.cuda.*Tensor` types). Context parallelism and CUDA graphs are not patched either. Those decisions
live in the device policy (policy.py), which enables this module when it resolves to the CPU; this module only
patches.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_ENABLED = False


def is_cpu_mode() -> bool:
    """True once `enable()` has patched megatron-core for the CPU (never when CUDA is available)."""
    return _ENABLED


def enable() -> bool:
    """Patch megatron-core for the CPU when CUDA is absent. Returns True when CPU mode is (now) active."""
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    _patch_torch_cuda()
    _patch_rng_tracker()
    _patch_scoped_cpu_functions()
    _patch_causal_masks()
    _patch_clip_grads()
    _ENABLED = True
    log.info("megatune CPU mode: megatron-core's CUDA calls point at the CPU")
    return True


# --------------------------------------------------------------------------------------------- 1. torch.cuda
def _patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None


# --------------------------------------------------------------------------------------------- 2. RNG tracker
def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _patch_rng_tracker() -> None:
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    base = random.CudaRNGStatesTracker

    class CpuRNGStatesTracker(base):
        """megatron-core's tracker with the CPU generator standing in for the CUDA one."""

        def __init__(self, use_cudagraphable_rng=False, is_inference_rng_tracker=False):
            super().__init__(use_cudagraphable_rng=False, is_inference_rng_tracker=is_inference_rng_tracker)

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            # Same bookkeeping as the CUDA version, minus its "CPU RNG state changed" warning, which in CPU mode
            # would fire on every fork because the CPU generator *is* the forked generator.
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state, orig_name = torch.get_rng_state(), self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    # initialize_rng_tracker() and get_all_rng_states() look the class up by module global at call time.
    random.CudaRNGStatesTracker = CpuRNGStatesTracker
    random._get_cuda_rng_state = _cpu_get_rng_state
    random._set_cuda_rng_state = _cpu_set_rng_state
    if random._CUDA_RNG_STATE_TRACKER is not None and not isinstance(random._CUDA_RNG_STATE_TRACKER,
                                                                      CpuRNGStatesTracker):
        random.initialize_rng_tracker(force_reset=True)


# --------------------------------------------------------------------------------------------- 3. device="cuda"
def _is_cuda(dev) -> bool:
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return isinstance(dev, int)  # a bare int device index means a CUDA ordinal


class _CudaAsCpu(TorchFunctionMode):
    """Rewrites device="cuda" / Tensor.cuda() / .to("cuda") / pin_memory=True to the CPU for the ops it sees."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "cuda" and args and isinstance(args[0], torch.Tensor):
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if name == "to" and len(args) > 1 and isinstance(args[1], (str, torch.device)) and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def on_cpu(fn):
    """Wrap `fn` so literal CUDA tensor creation inside it lands on the CPU (see module docstring, item 3)."""
    if getattr(fn, "_megatune_on_cpu", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _CudaAsCpu():
            return fn(*args, **kwargs)

    wrapper._megatune_on_cpu = True
    return wrapper


def _wrap(module_name: str, attr_path: str) -> None:
    """Replace module_name.attr_path (e.g. "Class.method") by its on_cpu() wrapper; skip quietly if absent
    (a newer megatron-core may have dropped it, in which case the CUDA call is gone too)."""
    try:
        owner = importlib.import_module(module_name)
    except ImportError:
        return
    *parents, leaf = attr_path.split(".")
    for part in parents:
        owner = getattr(owner, part, None)
        if owner is None:
            return
    fn = owner.__dict__.get(leaf) if isinstance(owner, type) else getattr(owner, leaf, None)
    if fn is None:
        log.debug("cpu_mode: %s.%s not found, not patched", module_name, attr_path)
        return
    setattr(owner, leaf, on_cpu(fn))


_SCOPED = (
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_no_pipelining"),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_pipelining_without_interleaving"),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_pipelining_with_interleaving"),
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer"),
    ("megatron.core.optimizer.clip_grads", "get_grad_norm_fp32"),
    ("megatron.core.optimizer.clip_grads", "count_zeros_fp32"),
    ("megatron.core.optimizer.optimizer", "FP32Optimizer.__init__"),
    ("megatron.core.tensor_parallel.data", "broadcast_data"),
)


def _patch_scoped_cpu_functions() -> None:
    for module_name, attr in _SCOPED:
        _wrap(module_name, attr)
    # optimizer.py (and layer_wise_optimizer.py) imported the clip_grads helpers by name: rebind them there too.
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    for module_name in ("megatron.core.optimizer.optimizer", "megatron.core.optimizer.layer_wise_optimizer"):
        try:
            mod = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in ("get_grad_norm_fp32", "count_zeros_fp32"):
            if hasattr(mod, name):
                setattr(mod, name, getattr(clip_grads, name))


# --------------------------------------------------------------------------------------------- 4. causal mask
@functools.lru_cache(maxsize=32)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)  # True = masked out, as megatron-core


def _cpu_sliding_window_mask(sq, skv, window_size):
    m = torch.ones(sq, skv, dtype=torch.bool)
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    return ~torch.tril(mu, diagonal=skv - sq + window_size[1])


def _patch_causal_masks() -> None:
    for module_name in ("megatron.core.transformer.utils", "megatron.core.fusions.fused_softmax"):
        mod = importlib.import_module(module_name)
        if hasattr(mod, "get_default_causal_mask"):
            mod.get_default_causal_mask = _cpu_causal_mask
        if hasattr(mod, "get_sliding_window_causal_mask"):
            mod.get_sliding_window_causal_mask = _cpu_sliding_window_mask


# --------------------------------------------------------------------------------------------- 5. grad clipping
def _cpu_clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """clip_grads.clip_grad_by_total_norm_fp32 without the torch.cuda.FloatTensor assert / multi_tensor_applier."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    for g in grads:
        assert g.dtype in (torch.float32, torch.bfloat16), f"grad clipping expects fp32/bf16 grads, got {g.dtype}"
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        with torch.no_grad():
            for g in grads:
                g.detach().mul_(clip_coeff)


def _patch_clip_grads() -> None:
    for module_name in ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer"):
        mod = importlib.import_module(module_name)
        if hasattr(mod, "clip_grad_by_total_norm_fp32"):
            mod.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32
