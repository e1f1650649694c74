"""Summarise py-spy raw (collapsed) stacks: only samples inside decode_tokens; self and inclusive share per frame."""
import sys, collections, re
incl, selfc = collections.Counter(), collections.Counter()
tot = 0
for line in open(sys.argv[1]):
    stack, n = line.rsplit(" ", 1); n = int(n)
    frames = stack.split(";")
    idx = [i for i, f in enumerate(frames) if f.startswith("decode_tokens")]
    if not idx: continue
    frames = frames[idx[0]:]
    tot += n
    def name(f): 
        m = re.match(r"(.*?) \((.*?):(\d+)\)", f)
        return f"{m.group(1)} ({m.group(2).split('site-packages/')[-1].split('src/')[-1]})" if m else f
    for f in set(name(f) for f in frames): incl[f] += n
    selfc[name(frames[-1])] += n
print(f"samples in decode_tokens: {tot}")
print("inclusive:")
for f, n in incl.most_common(int(sys.argv[2]) if len(sys.argv) > 2 else 30): print(f"  {100*n/tot:5.1f}%  {f}")
print("self:")
for f, n in selfc.most_common(20): print(f"  {100*n/tot:5.1f}%  {f}")
