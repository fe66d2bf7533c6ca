"""Test harness only: lets every process of a multi-process CPU test write the persistent
compilation cache, not only process 0.

`tests/test_hosts.py` puts this folder on the launched processes' PYTHONPATH, where Python
imports it at start-up. JAX writes cache entries from process 0 alone (on a pod all
processes share one cache key, so one writer is enough), but on CPU the key includes the
topology of the process's own devices, so process 1's executables differ from process 0's
and would be compiled afresh at every launch: minutes on a two-core machine. Nothing here
changes what is computed; a JAX without this internal function is left as it is.
"""

try:
    from jax._src import compilation_cache, compiler
    from jax._src import config as jax_config
except ImportError:  # pragma: no cover - another JAX layout: compile as usual.
    compiler = None


def _cache_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
    """`compiler._cache_write` without its process-0-only rule."""
    if host_callbacks:
        return
    if compile_time_secs < jax_config.persistent_cache_min_compile_time_secs.value:
        return
    compilation_cache.put_executable_and_time(
        cache_key, module_name, executable, backend, int(compile_time_secs)
    )


def _same_signature() -> bool:
    import inspect

    original = getattr(compiler, "_cache_write", None)
    if original is None:
        return False
    return list(inspect.signature(original).parameters) == list(
        inspect.signature(_cache_write).parameters
    )


if compiler is not None and _same_signature():  # Another JAX: leave it as it is.
    compiler._cache_write = _cache_write
