"""Does drafting while the target verifies pay here (PEARL's parallel drafting)? Times, on a bundle with an MTP
head: a verify pass of R rows, then D head passes, one after the other (what the decode loop does), against the
head passes run in a second thread while the verify pass runs (what parallel drafting would do at best: no
wasted drafts, no synchronisation beyond one join). Interleaved rounds, medians; prints the ratio.

    python tools/pearl_overlap.py BUNDLE [--threads 2] [--rows 8] [--head-passes 2] [--rounds 30]
"""
import argparse
import statistics
import threading
import time

import numpy as np

import speccompile
from speccompile.cli.errors import one_line_errors


@one_line_errors  # bad input (a bundle, a dataset line): one `error:` line, as the CLI gives
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--head-passes", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--length", type=int, default=256)
    a = ap.parse_args()
    g = speccompile.load(a.bundle, threads=a.threads)
    head = next(d for d in g.drafters.values() if getattr(d, "engine", None) is not None).engine
    target, n = g.target, a.length
    tokens, parents = np.ones(a.rows, np.int64), np.arange(a.rows) - 1
    hidden = np.zeros((1, head.hidden.shape[1]), np.float32)

    def verify():
        target.cache.truncate(n)
        target.verify(tokens, None, parents)

    def draft():
        for i in range(a.head_passes):
            head.cache.truncate(n + i)
            head.forward(np.ones(1, np.int64), positions=np.array([n + i]), hidden_in=hidden)

    def sequential():
        verify()
        draft()

    def overlapped():
        t = threading.Thread(target=draft)
        t.start()
        verify()
        t.join()

    times = {"verify": [], "draft": [], "sequential": [], "overlapped": []}
    for fn in (verify, draft, sequential, overlapped):  # warm-up
        fn()
    for _ in range(a.rounds):
        for name, fn in (("verify", verify), ("draft", draft), ("sequential", sequential),
                         ("overlapped", overlapped)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(", ".join(f"{k} {v:.2f} ms" for k, v in med.items()))
    print(f"overlapped / sequential: {med['overlapped'] / med['sequential']:.3f}")


if __name__ == "__main__":
    main()
