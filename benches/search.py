"""faiss's side of benches/search.rs: exact L2 search of Q.npy against D.npy with IndexFlatL2 on
THREADS threads, the search timed alone (after `add`), median of REPEATS runs.

Usage: python3 benches/search.py Q.npy D.npy K THREADS REPEATS OUT.npy
Prints `ms_per_search=...`; writes the indices of the last run to OUT.npy for the comparison.
"""
import sys
import time

import faiss
import numpy as np


def main():
    queries_path, database_path, k, threads, repeats, out = sys.argv[1:]
    k, threads, repeats = int(k), int(threads), int(repeats)
    faiss.omp_set_num_threads(threads)
    queries = np.load(queries_path)
    index = faiss.IndexFlatL2(queries.shape[1])
    index.add(np.load(database_path, mmap_mode="r"))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, found = index.search(queries, k)
        times.append((time.perf_counter() - start) * 1e3)
    np.save(out, found.astype(np.float32))
    print(f"ms_per_search={sorted(times)[len(times) // 2]:.3f}")


if __name__ == "__main__":
    main()
