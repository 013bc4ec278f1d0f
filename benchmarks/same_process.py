#!/usr/bin/env python3
"""edgellama's loop and onnxruntime-genai's own, on the same graph, in ONE process,
alternating generation by generation (128 greedy tokens after a 9-token prompt).

Removes what differs between processes (and the host's drift over minutes) from the
comparison; benchmarks/same_graph.py is the cross-process version. Run with genai's venv
and edgellama on the path:

    PYTHONPATH=<dir with an 'edgellama' link to the repo> /work/peers/genai/bin/python \
        benchmarks/same_process.py /work/peers/out/genai-int4 12
"""
import sys, time, json, statistics
import onnxruntime_genai as og
from edgellama.runtime.model import Model
path = sys.argv[1]
cfg = og.Config(path)
cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": 2, "inter_op_num_threads": 1}}}}))
gm = og.Model(cfg)
em = Model.load(path, threads=2)
ids = [504, 1450, 2775, 563, 5646, 314, 624, 2470, 288]
N = 128
def genai():
    p = og.GeneratorParams(gm); p.set_search_options(do_sample=False, max_length=len(ids) + N, min_length=len(ids) + N)
    g = og.Generator(gm, p); g.append_tokens(ids); g.generate_next_token()
    t = time.perf_counter(); n = 1
    while n < N and not g.is_done():
        g.generate_next_token(); g.get_next_tokens(); n += 1
    return (n - 1) / (time.perf_counter() - t)
def ours():
    it = iter(em.generate(ids, max_new_tokens=N, ignore_eos=True)); next(it)
    t = time.perf_counter(); n = 1
    for st in it:
        if st.token_id is not None: n += 1
    return (n - 1) / (time.perf_counter() - t)
genai(); ours()
ratios, G, E = [], [], []
for r in range(int(sys.argv[2])):
    a, b = (genai(), ours()) if r % 2 == 0 else tuple(reversed((ours(), genai())))
    G.append(a); E.append(b); ratios.append(b / a)
print(path.split("/")[-1], "genai median %.1f, edgellama median %.1f tok/s, median ratio %.3f (%.3f-%.3f)" % (
    statistics.median(G), statistics.median(E), statistics.median(ratios), min(ratios), max(ratios)))
