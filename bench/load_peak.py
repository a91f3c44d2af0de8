"""Peak RSS of loading a model quantized (no generation): python bench/load_peak.py SRC int4"""
import json
import sys
import time

import torch

torch.set_num_threads(2)
from mistral7b.quant import load_quantized
from mistral7b.weights import open_checkpoint


def st():
    return {l.split(":")[0]: int(l.split()[1])//1000 for l in open("/proc/self/status") if l.startswith(("VmHWM","VmRSS","RssAnon","RssFile"))}
t=time.time()
r=open_checkpoint(sys.argv[1])
m=load_quantized(r, sys.argv[2], dtype=torch.bfloat16, device="cpu")
n=sum(b.nbytes for b in m.buffers())+sum(p.nbytes for p in m.parameters())
print(json.dumps({"src": sys.argv[1], "quant": sys.argv[2], "load_s": round(time.time()-t,1), "model_MB": n//10**6, **st()}))
