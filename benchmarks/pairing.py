"""Paired timing, shared by ``run.py`` (TensorFlow, through ``timing.py``) and
``jax_rows.py`` (JAX, which needs no TensorFlow), so this module imports neither.

After a warm-up, each of ``repeats`` rounds times the candidate and the baseline back
to back, alternating which goes first, each sample lasting about ``target_s``; the
result is the median times and the median of the per-round ratios, so load from
other processes hits both sides of a ratio alike.
"""

import statistics
import time


def _sample(fn, calls, sync):
    start = time.perf_counter()
    for _ in range(calls):
        out = fn()
    sync(out)
    return (time.perf_counter() - start) / calls


def compare_times(candidate, baseline, repeats, target_s, sync, warmup=3):
    """(median candidate s, median baseline s, median of per-round ratios).

    ``sync(out)`` waits for a function's last output (a device synchronisation, or
    ``block_until_ready``) so that a sample times finished work.
    """
    for _ in range(warmup):
        sync(candidate())
        sync(baseline())
    calls = min(max(1, min(200, int(target_s / max(_sample(fn, 1, sync), 1e-6))))
                for fn in (candidate, baseline))
    cand, base, ratios = [], [], []
    for i in range(repeats):
        if i % 2:
            b = _sample(baseline, calls, sync)
            c = _sample(candidate, calls, sync)
        else:
            c = _sample(candidate, calls, sync)
            b = _sample(baseline, calls, sync)
        cand.append(c)
        base.append(b)
        ratios.append(c / b)
    return statistics.median(cand), statistics.median(base), statistics.median(ratios)
