"""DeepSeek-V3 figures on a tiny random checkpoint (MLA + MoE + MTP): KV bytes per token for the latent and the
expanded cache layouts, verify-pass time for each, decode tokens/s, and mean accepted tokens with the MTP module.

    python tools/bench_deepseek.py [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import numpy as np

from speccompile.cli.errors import one_line_errors


@one_line_errors  # bad input (a bundle, a dataset line): one `error:` line, as the CLI gives
def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--committed", type=int, default=768)
    a = ap.parse_args()
    import speccompile
    from speccompile.compile.driver import build_bundle
    from speccompile.format.bundle import read_manifest
    from speccompile.compile.presets import tiny_deepseek_checkpoint
    from speccompile.runtime.engine import Engine
    d = tempfile.mkdtemp()
    tiny_deepseek_checkpoint(f"{d}/ck", with_mtp=True)
    out = {}
    for layout in ("latent", "expanded"):
        b = f"{d}/{layout}"
        build_bundle(f"{d}/ck", b, drafts=[f"mtp:{d}/ck"], max_seq_len=1024, mla_cache=layout,
                     progress=lambda *_: None)
        m = read_manifest(b)
        kv = m["models"]["target"]["kv_cache"]
        bytes_per_token = 2 * kv["num_layers"] * kv["num_kv_heads"] * kv["head_dim"] * 4
        eng = Engine(b, m["models"]["target"], threads=a.threads, max_rows=64)
        ctx = np.random.default_rng(0).integers(3, 384, a.committed)
        for s in range(0, a.committed, 128):
            eng.forward(ctx[s:s + 128])
            eng.cache.truncate(s + len(ctx[s:s + 128]))
        verify = {}
        for S in (1, 4, 16):
            ts = []
            for _ in range(30):
                t0 = time.perf_counter()
                eng.forward(ctx[:S], rows=np.arange(S))
                ts.append(time.perf_counter() - t0)
            verify[S] = statistics.median(ts) * 1000
        g = speccompile.load(b, threads=a.threads, context_cache=False)
        ar, mtp, acc = [], [], []
        for i in range(6):
            prompt = list(np.random.default_rng(i).integers(3, 384, 24))
            r0 = g.generate(prompt, 96, speculate=False)
            r1 = g.generate(prompt, 96, drafter="mtp")
            assert r0.token_ids == r1.token_ids
            ar.append(r0.stats["tokens_per_second"])
            mtp.append(r1.stats["tokens_per_second"])
            acc.append(r1.stats["mean_accepted_tokens"])
        out[layout] = {"kv_bytes_per_token": bytes_per_token, "verify_ms_at_committed": verify,
                       "decode_tok_s": statistics.median(ar), "mtp_tok_s": statistics.median(mtp),
                       "mtp_mean_accepted_tokens": statistics.mean(acc)}
        print(f"{layout:9s} KV {bytes_per_token:6d} B/token | verify ms at {a.committed} committed: "
              + ", ".join(f"S={k}: {v:.2f}" for k, v in verify.items())
              + f" | decode {out[layout]['decode_tok_s']:.0f} tok/s, MTP {out[layout]['mtp_tok_s']:.0f} tok/s, "
                f"mean accepted {out[layout]['mtp_mean_accepted_tokens']:.2f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
