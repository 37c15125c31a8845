"""A request alone must not get slower with the scheduler: the same Generator decodes each prompt through the
scheduler (slot 0, the single-sequence graph, run by the calling thread) and through the serialized path
(Generator.steps under the lock, the code before batching), alternating which goes first; prints the median of the
per-prompt time ratios (serialized / scheduler: above 1, the scheduler is faster).

    python tools/bench_solo_scheduler.py BUNDLE N_PROMPTS MAX_NEW_TOKENS spec|ar
"""
import json, sys, time, statistics
import speccompile
from speccompile.bench.prompts import default_dataset
b=sys.argv[1]; n=int(sys.argv[2]); M=int(sys.argv[3]); spec=sys.argv[4]=="spec"
g=speccompile.load(b, threads=2, context_cache=False)
qs=[json.loads(l) for l in open(sys.argv[5] if len(sys.argv) > 5 else default_dataset())]
prompts=[q["turns"][0] for q in qs[::max(1,len(qs)//n)]][:n]
sched=g.scheduler
def run(p, use):
    g.scheduler = sched if use else None
    t=time.perf_counter(); r=g.generate(p, M, speculate=spec); return time.perf_counter()-t, r.token_ids
run(prompts[0], True); run(prompts[0], False)
ratios=[]; same=True
for i,p in enumerate(prompts):
    order=[True,False] if i%2 else [False,True]
    res={u: run(p,u) for u in order}
    ratios.append(res[False][0]/res[True][0]); same &= res[True][1]==res[False][1]
print(f"{'spec' if spec else 'autoregressive'}: {n} prompts x {M} tokens: today/scheduler time ratio median {statistics.median(ratios):.3f} (per prompt {[round(r,3) for r in ratios]}), identical {same}")
