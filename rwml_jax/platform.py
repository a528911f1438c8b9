"""Platform rules: every choice that depends on the machine, resolved once into an `ExecutionConfig`.

The model, the sampler and the update read an `ExecutionConfig`; none of them looks at the machine.
This module holds every CPU-specific rule, the probes behind them (/proc/cpuinfo, sysfs, one compiled
probe program), and the glibc malloc settings of CPU hosts. Off the CPU every rule gives the plain
choice (scan over layers, "out_in" decode weights, no ordering barriers).

Execution options (all numerically equivalent up to float rounding):
- remat: rematerialise each decoder layer in the backward pass: "none" | "full" | "dots" (keep
  matmul outputs without batch dimensions, recompute the rest).
- unroll_layers: the training forward inlines every layer instead of a `lax.scan`. The scan's backward
  stacks each layer's residuals into [L, ...] buffers (zero-filled, written and read back by dynamic
  slices); unrolled, those copies go and XLA:CPU fuses across layers (`tiny` layer-stack gradient 166
  against 197 ms, the shared-prompt GRPO update 2.83 against 2.94 s) for a longer compile. "auto":
  on a CPU up to `AUTO_UNROLL_MAX_LAYERS` layers.
- weight_format: how the sampler stores and multiplies the decode weights
  (`rwml_jax.sampling.weight_format`): "out_in" ([out, in], contracted on the last axis), "in_out"
  ([in, out]) or "out_in_reduce" ([out, in], skinny products as a multiply-and-sum). "auto":
  `default_weight_format`.
- attention: the training / full-forward attention kernel (`rwml_jax.models.attention`): "xla" | "cudnn" |
  "splash". "auto": `default_attention`.
- ordered_head_grad: the LM head's VJP computes the hidden-state gradient before the weight gradient,
  each on every thread, and the weight gradient in the head's [E, V] orientation. Left alone, XLA:CPU
  runs the two products side by side on one thread each and folds the tied embedding's transpose into
  the weight gradient ([V, E], ~1.4x slower): 224 against 182 ms for a [4096, 8192] x [8192, 256] pair on
  2 threads. On for CPUs (measured there only).

Host settings (CPU hosts only, `reexec_with_malloc_tunables`): XLA's CPU runtime allocates every
executable's output and temporary buffers afresh on each call; glibc serves allocations above 32 MiB
with a fresh `mmap` and returns them with `munmap`, so each call page-faults them in again (the `tiny`
GRPO update faulted ~2.4 GB per call: 1.4-1.8 s of system time in a ~5 s update). The tunables keep freed
memory in the process: `mmap_max=0` (no allocation by mmap), `arena_max=1` (one growable heap),
`trim_threshold=64 GiB` (nothing given back), and `hugetlb=1` (glibc >= 2.35, THP mode `madvise`). They are
read when a process starts, so the entry points re-exec themselves once with them set (children inherit
them). RWML_NO_REEXEC=1 turns this off.

JAX is imported inside the functions that need it, not at module level: the entry points re-exec before
any work (importing JAX first would cost its import twice), and config validation reads this module's
option names without loading JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Iterable
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")  # parameter / compute dtypes a model loads in
REMAT_POLICIES = ("none", "full", "dots")
LAYER_LOOPS = ("auto", "scan", "unroll")
WEIGHT_FORMATS = ("auto", "out_in", "in_out", "out_in_reduce")
ATTENTION_KERNELS = ("auto", "xla", "cudnn", "splash")

AUTO_UNROLL_MAX_LAYERS = 12
# "out_in_reduce": products with more rows than this (a prefill) run as a dot_general; break-even ~128.
REDUCE_MAX_ROWS = 64
_DEFAULT_LLC_BYTES = 32 * 2**20


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
    """How the model runs on this machine (module docstring); hashable, a static jit argument."""

    remat: str = "none"
    unroll_layers: bool = False
    weight_format: str = "out_in"
    ordered_head_grad: bool = False
    attention: str = "xla"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KERNELS[1:]:
            raise ValueError(f"attention={self.attention!r}; expected one of {ATTENTION_KERNELS[1:]}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.weight_format not in WEIGHT_FORMATS[1:]:
            raise ValueError(f"weight orientation {self.weight_format!r}; expected one of {WEIGHT_FORMATS[1:]}")


def _all_cpu(devices: Iterable[Any]) -> bool:
    devices = list(devices)
    return bool(devices) and all(d.platform == "cpu" for d in devices)


def resolve(model_config: Any, devices: Iterable[Any] | None = None, *, remat: str = "none",
            layer_loop: str = "auto", weight_format: str = "auto", attention: str = "auto") -> ExecutionConfig:
    """The execution config of `model_config` (a `rwml_jax.models.ModelConfig`) on `devices` (default:
    all devices), with "auto" choices resolved by this module's rules."""
    if layer_loop not in LAYER_LOOPS:
        raise ValueError(f"layer_loop={layer_loop!r}; expected one of {LAYER_LOOPS}")
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight orientation {weight_format!r}; expected one of {WEIGHT_FORMATS}")
    if attention not in ATTENTION_KERNELS:
        raise ValueError(f"attention={attention!r}; expected one of {ATTENTION_KERNELS}")
    import jax

    devices = list(jax.devices() if devices is None else devices)
    cpu = _all_cpu(devices)
    if layer_loop == "auto":
        unroll = cpu and model_config.num_hidden_layers <= AUTO_UNROLL_MAX_LAYERS
    else:
        unroll = layer_loop == "unroll"
    if weight_format == "auto":
        weight_format = default_weight_format(devices, model_config)
    if attention == "auto":
        attention = default_attention(devices, model_config)
    return ExecutionConfig(remat=remat, unroll_layers=unroll, weight_format=weight_format, ordered_head_grad=cpu,
                           attention=attention)


def default_attention(devices: Iterable[Any], model_config: Any) -> str:
    """The training attention kernel: "splash" on TPUs; "cudnn" on NVIDIA GPUs when the model computes in
    bfloat16 or float16 (cuDNN's flash attention takes no float32); "xla" otherwise (CPUs)."""
    platforms = {d.platform for d in devices}
    if platforms == {"tpu"}:
        return "splash"
    if platforms == {"gpu"} and str(model_config.compute_dtype) in ("bfloat16", "float16"):
        return "cudnn"
    return "xla"


@functools.cache
def _default_for(model_config: Any, platform: str) -> ExecutionConfig:
    import jax

    return resolve(model_config, jax.devices(platform))


def default_execution(model_config: Any) -> ExecutionConfig:
    """`resolve` with every choice "auto" on the default backend (what a caller gets when it passes none)."""
    import jax

    return _default_for(model_config, jax.default_backend())


def embedder_dtype(devices: Iterable[Any], requested: str) -> str:
    """The dtype an embedding model runs in: `requested` on accelerators, float32 on CPUs (XLA:CPU has no
    fast bfloat16 matmul, and the reward threshold was set on float32 embeddings)."""
    return "float32" if _all_cpu(devices) else requested


def embedder_tokens_per_call(devices: Iterable[Any]) -> int:
    """Tokens per device in one embedder call: 2,048 on CPUs (a call's activations stay in the caches),
    32,768 on accelerators."""
    return 2048 if _all_cpu(devices) else 32768


# ---------------------------------------------------------------------------------------------------
# The decode weight format rule and its probes
# ---------------------------------------------------------------------------------------------------

def multiply_and_sum(x: Any, w: Any) -> Any:
    """x [N, in] times w [out, in] as an element-wise product summed over `in` -> [N, out] float32.

    XLA:CPU hands this to YNNPACK's reduction kernel, which streams w once; a GEMM first packs (copies)
    its weight operand, as much traffic as the product itself for a skinny product whose weights come from
    DRAM every decode step."""
    import jax.numpy as jnp

    f32 = jnp.float32
    return jnp.sum(w[None, :, :].astype(f32) * x[:, None, :].astype(f32), axis=-1)


@functools.cache
def cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


@functools.cache
def last_level_cache_bytes() -> int:
    """The largest CPU cache of cpu0 in bytes (sysfs), or 32 MiB where sysfs does not say."""
    root = "/sys/devices/system/cpu/cpu0/cache"
    sizes = []
    try:
        for entry in os.listdir(root):
            try:
                with open(os.path.join(root, entry, "size")) as f:
                    text = f.read().strip()
            except OSError:
                continue
            unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
            sizes.append(int(text.rstrip("KMGkmg")) * unit)
    except (OSError, ValueError):
        return _DEFAULT_LLC_BYTES
    return max(sizes) if sizes else _DEFAULT_LLC_BYTES


@functools.cache
def cpu_reduce_is_library_kernel() -> bool:
    """Whether this XLA:CPU build hands a skinny `multiply_and_sum` to a library kernel (YNNPACK) instead
    of its own loop emitter, which is no faster than the dot."""
    import jax
    import jax.numpy as jnp

    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:
        return False
    on_cpu = jax.sharding.SingleDeviceSharding(cpu)
    x = jax.ShapeDtypeStruct((16, 256), jnp.float32, sharding=on_cpu)
    w = jax.ShapeDtypeStruct((512, 256), jnp.float32, sharding=on_cpu)
    return "ynn_fusion" in jax.jit(multiply_and_sum).lower(x, w).compile().as_text()


def weight_bytes(model_config: Any) -> int:
    """Bytes of the weights one decode step reads (every parameter, in `param_dtype`)."""
    import jax.numpy as jnp

    return model_config.num_params * jnp.dtype(model_config.param_dtype).itemsize


def default_weight_format(devices: Iterable[Any], model_config: Any = None) -> str:
    """The decode weight format for `devices` (and, on a CPU, for the model's size):
    - not all devices CPUs: "out_in";
    - a CPU, the weights larger than the last-level cache and XLA lowering `multiply_and_sum` to a library
      kernel: "out_in_reduce" (`small` decode step 41.9 against 50.3 ms in "in_out"; `tiny`, whose weights
      stay in a 32 MB L3, is 0.86-0.92x slower that way);
    - otherwise a CPU with AVX-512: "in_out" (XLA's [16, 768] x [768, 4096] product 109 against 62 GFLOP/s
      as [out, in] on an AMD Zen 4; whole `tiny` / `small` generation 1.15x); without: "out_in" (an AVX2
      machine streamed [out, in] at 5-7 GB/s against 3-4 GB/s as [in, out]).
    A fixed rule rather than a timing probe, so that one machine always compiles the same program for a
    model and a seeded run repeats its tokens exactly."""
    if not _all_cpu(devices):
        return "out_in"
    if (model_config is not None and weight_bytes(model_config) > last_level_cache_bytes()
            and cpu_reduce_is_library_kernel()):
        return "out_in_reduce"
    return "in_out" if cpu_has_avx512() else "out_in"


# ---------------------------------------------------------------------------------------------------
# Host process settings: glibc malloc tunables for CPU hosts
# ---------------------------------------------------------------------------------------------------

HEAP_TUNABLES = ("glibc.malloc.mmap_max=0", "glibc.malloc.arena_max=1", f"glibc.malloc.trim_threshold={64 << 30}")
HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, ...] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        return None
    if name != "glibc":
        return None
    return tuple(int(x) for x in version.split(".")[:2] if x.isdigit())


def _thp_mode() -> str | None:
    try:
        with open(_THP_MODE) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _accelerator_plugin_installed() -> bool:
    """Whether a JAX accelerator backend is installed (found without initialising a backend)."""
    if importlib.util.find_spec("libtpu") is not None:
        return True
    try:
        plugins = importlib.util.find_spec("jax_plugins")
    except (ImportError, ValueError):
        return False
    return plugins is not None and any(True for _ in pkgutil.iter_modules(plugins.submodule_search_locations))


def jax_runs_on_cpu(environ: dict[str, str] | None = None) -> bool:
    """JAX_PLATFORMS names only `cpu`, or it is unset and no accelerator plugin is installed."""
    env = os.environ if environ is None else environ
    platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms == ["cpu"]
    return not _accelerator_plugin_installed()


def malloc_tunables() -> tuple[str, ...]:
    """The tunables for this machine: `HEAP_TUNABLES` on glibc >= 2.26 (none elsewhere), plus
    `HUGE_PAGE_TUNABLE` on glibc >= 2.35 where the kernel's THP mode is `madvise`."""
    if not sys.platform.startswith("linux"):
        return ()
    version = _glibc_version()
    if version is None or version < (2, 26):
        return ()
    if version >= (2, 35) and _thp_mode() == "madvise":
        return (*HEAP_TUNABLES, HUGE_PAGE_TUNABLE)
    return HEAP_TUNABLES


def _set_tunables(env: dict[str, str]) -> list[str]:
    """The `name=value` items of GLIBC_TUNABLES, in order."""
    return [item for item in env.get("GLIBC_TUNABLES", "").split(":") if item]


def missing_tunables(environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """The tunables a re-exec would add: empty when RWML_NO_REEXEC is set, JAX does not run on the CPU,
    or GLIBC_TUNABLES already sets each of them (to any value: the user's choice wins)."""
    env = os.environ if environ is None else environ
    if env.get("RWML_NO_REEXEC") or not jax_runs_on_cpu(env):
        return ()
    present = {item.split("=")[0] for item in _set_tunables(env)}
    return tuple(t for t in malloc_tunables() if t.split("=")[0] not in present)


def environment_with_tunables(tunables: tuple[str, ...], environ: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment with `tunables` appended to GLIBC_TUNABLES (other tunables kept)."""
    env = dict(os.environ if environ is None else environ)
    env["GLIBC_TUNABLES"] = ":".join([*_set_tunables(env), *tunables])
    return env


def reexec_with_malloc_tunables(main_argv: list[str] | None = None) -> None:
    """Replace this process by the same command line with `missing_tunables()` set, if there are any.

    Call it first thing in a `main(argv=None)`, passing main's `argv`, before any work (the process
    restarts from the beginning). Returns without doing anything when `main_argv` is not None (main was
    called from Python, e.g. a test, not run as a program), when nothing is missing, or when the original
    command line is unknown.
    """
    argv = getattr(sys, "orig_argv", None)
    if main_argv is not None or not argv:
        return
    tunables = missing_tunables()
    if not tunables:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], environment_with_tunables(tunables))
