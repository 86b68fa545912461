"""One OpenMP team per process: the main thread's.

    confine_helper_threads()      # init_distributed calls it before any process group starts its threads

Why: a thread that runs an ATen operator in parallel becomes the master of an OpenMP team of its
own. gloo's work threads (``pt_gloo_runloop``) do: an all-gather copies its result into the output
tensors there (``AsyncAllgatherWork::allgather`` -> ``at::copy_``), and ZeRO-3 gathers parameters
that way (``zero.Init``, and every step's gather), on one rank too. Their teams' threads then
outnumber the CPUs, so libgomp stops spinning at its barriers and sleeps instead, and every parallel
region of the training step waits for its workers to be woken.

PyTorch sizes a thread's team from the process-wide thread count when that thread runs its first
parallel operator (``at::init_num_threads``); a thread that has run one keeps its own count. So the
main thread's count is fixed first, then the process-wide count is set to 1 from a short-lived
thread: every thread started later (gloo's, whatever group creates them) runs its operators on one
thread, and the main thread keeps its own.
"""
from __future__ import annotations

import threading

import torch


def confine_helper_threads() -> int:
    """Threads started from now on run ATen operators on one thread; the calling thread keeps its
    count -> that count. Call it from the thread that trains; calling it again changes nothing."""
    threads = torch.get_num_threads()       # fixes this thread's own count now, before the default changes
    helper = threading.Thread(target=torch.set_num_threads, args=(1,), name="confine-omp")
    helper.start()
    helper.join()
    return threads

