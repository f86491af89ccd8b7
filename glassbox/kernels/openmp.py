"""This thread's OpenMP team: one thread, none started.

GNU OpenMP counts the threads of every team in the process, and once they outnumber the cores it cuts the
spinning of all of them, the engine's included: its worker then sleeps between two parallel regions and is
woken for the next, and a prefill of a few tokens went from 12.0 to 15.2 ms on 2 cores (medians,
interleaved; an idle second team alive, nothing running on it). A team lives as long as the thread that
made it, so a thread beside the engine's that runs one parallel op slows every later engine step. Threads
beside the engine's call one_openmp_thread() first."""

from __future__ import annotations

import ctypes

import torch


def one_openmp_thread() -> None:
    """Run this thread's torch ops (and MKL's) on one thread: no OpenMP team of its own. The count is the
    calling thread's own (OpenMP's per-thread setting; torch.set_num_threads would change the default of
    threads made later, the engine's workers among them). Nothing happens without OpenMP."""
    torch.get_num_threads()  # torch's per-thread set-up first: it would otherwise reset the count at the first op
    try:
        set_num_threads = ctypes.CDLL(None).omp_set_num_threads  # (torch's libgomp, loaded with its symbols global)
    except (AttributeError, OSError):
        return
    set_num_threads(1)
