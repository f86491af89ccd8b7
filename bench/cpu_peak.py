"""What this CPU can do at most, to read the other CPU benchmarks against: float32 multiply-adds per second
(vfmadd on independent registers), int8 multiply-adds per second (vpmaddubsw: 32 per instruction, the
integer dot product of the int8 activation path) and memory read bandwidth, on 1 thread and on all.

    .venv/bin/python bench/cpu_peak.py

x86-64 with AVX2 only (the machine's C compiler builds a small probe). A decode step of the default model
is 134.5 M multiply-adds a token (30 layers x 3.54 M + the 28.3 M of the LM head), so N tokens/s at large
batch needs at least N x 134.5 M multiply-adds/s of whichever kind the linear layers use.
"""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

PROBE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
#define FMA(r) __asm__ volatile("vfmadd132ps %1, %2, %0" : "+x"(r) : "x"(b), "x"(c))
#define MADD(r) __asm__ volatile("vpmaddubsw %1, %2, %0" : "=x"(r) : "x"(u), "x"(s))
int main(void) {
    const long n = 50000000;
    const size_t bytes = (size_t)256 << 20;
    char *mem = aligned_alloc(64, bytes);
    for (size_t i = 0; i < bytes; i++) mem[i] = (char)i;
    int all = omp_get_max_threads();
    for (int threads = 1; threads <= all; threads += all - 1 > 0 ? all - 1 : 1) {
        double t0 = now();
#pragma omp parallel num_threads(threads)
        {
            __m256 r0 = _mm256_set1_ps(0.1f), r1 = r0, r2 = r0, r3 = r0, r4 = r0, r5 = r0, r6 = r0, r7 = r0, r8 = r0, r9 = r0;
            const __m256 b = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(0.001f);
            for (long i = 0; i < n; i++) { FMA(r0); FMA(r1); FMA(r2); FMA(r3); FMA(r4); FMA(r5); FMA(r6); FMA(r7); FMA(r8); FMA(r9); }
            volatile float sink = _mm256_cvtss_f32(_mm256_add_ps(r0, r9)); (void)sink;
        }
        const double fma = threads * n * 10.0 * 8 / (now() - t0) / 1e9;
        t0 = now();
#pragma omp parallel num_threads(threads)
        {
            __m256i r0, r1, r2, r3, r4, r5, r6, r7;
            const __m256i u = _mm256_set1_epi8(3), s = _mm256_set1_epi8(1);
            for (long i = 0; i < n; i++) { MADD(r0); MADD(r1); MADD(r2); MADD(r3); MADD(r4); MADD(r5); MADD(r6); MADD(r7); }
            volatile int sink = _mm256_extract_epi16(_mm256_add_epi16(r0, r7), 0); (void)sink;
        }
        const double madd = threads * n * 8.0 * 32 / (now() - t0) / 1e9;
        double best = 1e9;
        for (int rep = 0; rep < 5; rep++) {
            t0 = now();
            __m256i total = _mm256_setzero_si256();
#pragma omp parallel num_threads(threads)
            {
                __m256i acc = _mm256_setzero_si256();
#pragma omp for
                for (size_t i = 0; i < bytes; i += 128)
                    for (int j = 0; j < 128; j += 32) acc = _mm256_add_epi8(acc, _mm256_load_si256((const __m256i *)(mem + i + j)));
#pragma omp critical
                total = _mm256_add_epi8(total, acc);
            }
            const double t = now() - t0;
            if (t < best) best = t;
            volatile int sink = _mm256_extract_epi8(total, 0); (void)sink;
        }
        printf("| %d | %.1f | %.1f | %.1f |\n", threads, fma, madd, bytes / best / 1e9);
    }
    return 0;
}
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "peak.c", Path(tmp) / "peak"
        source.write_text(PROBE)
        subprocess.run(["cc", "-O2", "-mavx2", "-mfma", "-fopenmp", "-o", str(binary), str(source)], check=True)
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())  # fmt: skip
        print(f"{model}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}\n")
        print("| threads | float32 multiply-adds (G/s) | int8 multiply-adds, vpmaddubsw (G/s) | memory read (GB/s) |")
        print("|---:|---:|---:|---:|")
        print(subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout, end="")


if __name__ == "__main__":
    main()
