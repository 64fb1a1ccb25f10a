"""Quick lab for the quality levers of structured MiniLM compression (docs/transformers.md).

A plain torch re-implementation of the BERT encoder (the packaged all-MiniLM-L6-v2 weights)
with per-layer kept heads / FFN neurons, so that selection criteria, allocations across
layers and closed-form refits can be compared in seconds on held-out sentences, before the
winner is built into the ONNX rewrites. Not used by the package.

    python tools/lab_minilm.py --calib 128 --held 100
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from pycompress.pretrained import minilm_encoder, minilm_inputs, stdlib_sentences

H, D, F, L = 12, 32, 1536, 6
T = 64
HEAD_MACS = T * 4 * 384 * D           # per sequence of 64 tokens (attention products counted once, as model_cost)
NEURON_MACS = T * 2 * 384
BASE_MACS = L * (H * HEAD_MACS + F * NEURON_MACS + 2 * T * T * D)


def weights():
    bert = minilm_encoder().bert
    sd = {k: v.detach().double() for k, v in bert.state_dict().items()}
    layers = []
    for i in range(L):
        p = f"encoder.layer.{i}."
        g = lambda s, p=p: sd[p + s].clone()
        layers.append({"q": g("attention.self.query.weight"), "qb": g("attention.self.query.bias"),
                           "k": g("attention.self.key.weight"), "kb": g("attention.self.key.bias"),
                           "v": g("attention.self.value.weight"), "vb": g("attention.self.value.bias"),
                           "o": g("attention.output.dense.weight"), "ob": g("attention.output.dense.bias"),
                           "ln1w": g("attention.output.LayerNorm.weight"), "ln1b": g("attention.output.LayerNorm.bias"),
                           "i": g("intermediate.dense.weight"), "ib": g("intermediate.dense.bias"),
                           "d": g("output.dense.weight"), "db": g("output.dense.bias"),
                           "ln2w": g("output.LayerNorm.weight"), "ln2b": g("output.LayerNorm.bias"), "heads": H})
    emb = {k[len("embeddings."):]: v for k, v in sd.items() if k.startswith("embeddings.")}
    return emb, layers


def ln(x, w, b):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, eps=1e-12)


def embed(emb, ids):
    pos = torch.arange(ids.shape[1])
    x = emb["word_embeddings.weight"][ids] + emb["position_embeddings.weight"][pos][None] \
        + emb["token_type_embeddings.weight"][0][None, None]
    return ln(x, emb["LayerNorm.weight"], emb["LayerNorm.bias"])


def attention(p, x, addmask):
    B, Tn, _ = x.shape
    h = p["heads"]
    if h == 0:
        return x.new_zeros(B, Tn, h * D), p["ob"].expand(B, Tn, -1).clone()
    r = p.get("dqk", D)                    # query/key width per head (qk_rank); the scale stays 1/sqrt(D)
    q = (x @ p["q"].T + p["qb"]).view(B, Tn, h, r).transpose(1, 2)
    k = (x @ p["k"].T + p["kb"]).view(B, Tn, h, r).transpose(1, 2)
    v = (x @ p["v"].T + p["vb"]).view(B, Tn, h, D).transpose(1, 2)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D) + addmask
    ctx = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, Tn, h * D)
    return ctx, ctx @ p["o"].T + p["ob"]


def layer_parts(p, x, addmask):
    """Every tensor of one layer: ctx (O input), a (attention out), h1 (FFN input), act (down input), f, y."""
    ctx, a = attention(p, x, addmask)
    h1 = ln(a + x, p["ln1w"], p["ln1b"])
    act = torch.nn.functional.gelu(h1 @ p["i"].T + p["ib"])
    f = act @ p["d"].T + p["db"]
    y = ln(f + h1, p["ln2w"], p["ln2b"])
    return {"x": x, "ctx": ctx, "a": a, "h1": h1, "act": act, "f": f, "y": y}


def addmask_of(mask):
    return (1.0 - mask[:, None, None, :].double()) * -1e9


def pooled(y, mask):
    m = mask[..., None].double()
    e = (y * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(e, dim=1)


def forward(emb, layers, ids, mask, capture=False):
    x = embed(emb, ids)
    am = addmask_of(mask)
    caps = []
    for p in layers:
        parts = layer_parts(p, x, am)
        if capture:
            caps.append(parts)
        x = parts["y"]
    return pooled(x, mask), caps


def macs(layers):
    return sum(p["heads"] * T * 384 * (2 * p.get("dqk", D) + 2 * D) + p["i"].shape[0] * NEURON_MACS + 2 * T * T * D
               for p in layers) / BASE_MACS


def qk_factor(p, c, mask, r, whiten=True):
    """Every head's query/key to rank r: the (whitened) SVD of its score form, as rewrites/qk_rank.py
    (torch weights are [out, in]; the key bias and the query-only terms are dropped)."""
    p = dict(p)
    X = rows(c["x"], mask)
    Xa = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
    G = Xa.T @ Xa / X.shape[0]
    S = torch.linalg.cholesky(G + 1e-6 * G.diagonal().mean() * torch.eye(385, dtype=X.dtype)) if whiten \
        else torch.eye(385, dtype=X.dtype)
    nq, nqb, nk = [], [], []
    for h in range(p["heads"]):
        sl = slice(h * D, (h + 1) * D)
        M = torch.cat([p["q"][sl].T, p["qb"][sl][None]], 0) @ torch.cat([p["k"][sl].T, p["kb"][sl][None]], 0).T
        M[:, -1] = 0
        U, sv, Vt = torch.linalg.svd(S.T @ M @ S)
        root = sv[:r].sqrt()
        A = torch.linalg.solve_triangular(S.T, U[:, :r] * root, upper=True)
        K = torch.linalg.solve_triangular(S.T, (root[:, None] * Vt[:r]).T, upper=True)
        nq.append(A[:384].T), nqb.append(A[384]), nk.append(K[:384].T)
    p["q"], p["qb"], p["k"] = torch.cat(nq, 0), torch.cat(nqb), torch.cat(nk, 0)
    p["kb"], p["dqk"] = torch.zeros(p["k"].shape[0], dtype=X.dtype), r
    return p


def rows(t, mask):
    return t[mask.bool()]


# -- selection -----------------------------------------------------------------------------

def moments(t, mask):
    r = rows(t, mask)
    return r.mean(0), r.var(0), (r * r).mean(0)


def scores(teacher_caps, layers, mask, criterion):
    """Per layer: (head scores [H], neuron scores [F]) on the teacher's statistics."""
    out = []
    for c, p in zip(teacher_caps, layers):
        res = []
        for name, w in (("ctx", p["o"]), ("act", p["d"])):
            _mu, var, sq = moments(c[name], mask)
            col = (w * w).sum(0)
            if criterion == "flap":
                s = var * col
            elif criterion == "wanda":
                s = sq.sqrt() * w.abs().sum(0)
            elif criterion == "second":
                s = sq * col
            else:
                raise ValueError(criterion)
            res.append(s)
        hs = res[0].view(H, D).sum(1)
        out.append((hs, res[1]))
    return out


def prune(layers, teacher_caps, mask, keep_heads, keep_neurons, compensate=True):
    """Slice every layer to the kept heads / neurons; the removed ones' mean into the next bias."""
    new = []
    for p, c, hk, nk in zip(layers, teacher_caps, keep_heads, keep_neurons):
        p = dict(p)
        hk = np.sort(np.asarray(hk, dtype=np.int64))
        nk = np.sort(np.asarray(nk, dtype=np.int64))
        cols = (hk[:, None] * D + np.arange(D)[None]).reshape(-1)
        gone = np.setdiff1d(np.arange(H * D), cols)
        if compensate and len(gone):
            mu = rows(c["ctx"], mask).mean(0)
            p["ob"] = p["ob"] + p["o"][:, gone] @ mu[gone]
        for n in ("q", "k", "v"):
            p[n] = p[n][cols]
            p[n + "b"] = p[n + "b"][cols]
        p["o"] = p["o"][:, cols]
        p["heads"] = len(hk)
        p["cols"], p["neurons"] = cols, nk
        gone = np.setdiff1d(np.arange(F), nk)
        if compensate and len(gone):
            mu = rows(c["act"], mask).mean(0)
            p["db"] = p["db"] + p["d"][:, gone] @ mu[gone]
        p["i"], p["ib"], p["d"] = p["i"][nk], p["ib"][nk], p["d"][:, nk]
        new.append(p)
    return new


def top(s, k):
    return np.argsort(-s.numpy(), kind="stable")[:k]


def uniform(sc, heads, neurons):
    return [top(h, heads) for h, _ in sc], [top(n, neurons) for _, n in sc]


def global_alloc(sc, budget, norm, teacher_caps, mask, min_heads=1, min_neurons=64):
    """Rank all heads and neurons together by (normalised score) / MACs; keep the best within budget."""
    items = []
    for l, ((hs, ns), c) in enumerate(zip(sc, teacher_caps)):
        for kind, s, cost in (("h", hs, HEAD_MACS), ("n", ns, NEURON_MACS)):
            s = s.numpy().copy()
            if norm == "residual":           # error relative to the residual stream it is added to
                s = s / float((rows(c["x"], mask) ** 2).sum(1).mean())
            elif norm == "std":              # FLAP: standardised per layer and module
                s = (s - s.mean()) / s.std() + 1e3    # shift: keep per-cost ranking monotone
            elif norm == "sum":              # share of the module's total
                s = s / s.sum()
            for j, v in enumerate(s):
                items.append((v / cost, l, kind, j, cost))
    items.sort(key=lambda t: -t[0])
    fixed = L * 2 * T * T * D
    spent = fixed
    kh = [[] for _ in range(L)]
    kn = [[] for _ in range(L)]
    # minimums first
    for l, (hs, ns) in enumerate(sc):
        kh[l] = list(top(hs, min_heads))
        kn[l] = list(top(ns, min_neurons))
        spent += min_heads * HEAD_MACS + min_neurons * NEURON_MACS
    for _, l, kind, j, cost in items:
        target = kh[l] if kind == "h" else kn[l]
        if j in target:
            continue
        if spent + cost > budget * BASE_MACS:
            continue
        target.append(j)
        spent += cost
    return kh, kn


# -- refit -----------------------------------------------------------------------------------

RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


class Moments:
    """Sums for a centred ridge fit: n, sum x, sum y, X^T X, X^T Y."""

    def __init__(self, X, Y):
        self.n, self.sx, self.sy = X.shape[0], X.sum(0), Y.sum(0)
        self.xx, self.xy, self.yy = X.T @ X, X.T @ Y, (Y * Y).sum()

    def minus(self, o):
        m = object.__new__(Moments)
        m.n, m.sx, m.sy, m.xx, m.xy, m.yy = self.n - o.n, self.sx - o.sx, self.sy - o.sy, self.xx - o.xx, \
            self.xy - o.xy, self.yy - o.yy
        return m

    def fit(self, w0, lam):
        mx, my = self.sx / self.n, self.sy / self.n
        G = self.xx - self.n * torch.outer(mx, mx)
        C = self.xy - self.n * torch.outer(mx, my)
        s = float(G.diagonal().mean())
        Wt = torch.linalg.solve(G + lam * s * torch.eye(G.shape[0], dtype=G.dtype), C + lam * s * w0.T)
        return Wt.T, my - mx @ Wt

    def error(self, W, b):
        # sum ||x W^T + b - y||^2 from the sums
        Wt = W.T
        return float(self.yy - 2 * (self.xy * Wt).sum() - 2 * (self.sy * b).sum() + (Wt * (self.xx @ Wt)).sum()
                     + 2 * (self.sx @ Wt * b).sum() + self.n * (b * b).sum())


def refit(X, Y, w0, b0, groups, mode):
    """Refit a linear on rows X -> Y; ridge chosen on held-out groups of sentences (toward w0)."""
    total = Moments(X, Y)
    if mode != "cv":
        W, b = total.fit(w0, float(mode))
        return W, b, float(mode)
    parts = [Moments(X[groups == g], Y[groups == g]) for g in np.unique(groups)]
    err0 = sum(p.error(w0, b0) for p in parts)
    best = (err0, None)
    for lam in RIDGES:
        e = sum(p.error(*total.minus(p).fit(w0, lam)) for p in parts)
        if e < best[0]:
            best = (e, lam)
    if best[1] is None:
        return w0, b0, None
    W, b = total.fit(w0, best[1])
    return W, b, best[1]


def obs_order(X, W, block, damp=1e-2):
    """Greedy OBS removal (ZipLM-style structured OBS): blocks of ``block`` input features of W
    removed one at a time, least output-error increase first (with the optimal update of the
    others). Returns (removal order of blocks, error increase at each step)."""
    Xc = X - X.mean(0)
    G = Xc.T @ Xc / X.shape[0]
    G = G + damp * float(G.diagonal().mean()) * torch.eye(G.shape[0], dtype=G.dtype)
    Gi = torch.linalg.inv(G)
    W = W.clone()
    nb = G.shape[0] // block
    alive = list(range(nb))
    order, incs = [], []
    while len(alive) > 1:
        if block == 1:
            idx = torch.tensor(alive)
            sal = (W[:, idx] ** 2).sum(0) / Gi.diagonal()[idx]
            take = torch.argsort(sal)[:max(1, min(16, (len(alive) - 1) // 8))]
            chosen = [alive[int(j)] for j in take]
            sals = [float(sal[int(j)]) for j in take]
            B = torch.tensor(chosen)
        else:
            best = None
            for b in alive:
                Bb = slice(b * block, (b + 1) * block)
                s = float(torch.trace(W[:, Bb] @ torch.linalg.solve(Gi[Bb, Bb], W[:, Bb].T)))
                if best is None or s < best[0]:
                    best = (s, b)
            chosen, sals = [best[1]], [best[0]]
            B = torch.arange(best[1] * block, (best[1] + 1) * block)
        inv = torch.linalg.inv(Gi[B][:, B])
        GB = Gi[B, :].clone()
        W -= (W[:, B] @ inv) @ GB
        Gi -= GB.T @ (inv @ GB)
        W[:, B] = 0
        for b, s in zip(chosen, sals):
            alive.remove(b)
            order.append(b)
            incs.append(s)
    order.append(alive[0])
    incs.append(float("inf"))
    return order, incs


def obs_plan(caps, layers, mask, damp=1e-2):
    """Per layer: (head order, head increments, neuron order, neuron increments) on teacher rows."""
    m = mask.bool()
    out = []
    for c, p in zip(caps, layers):
        ho, hi = obs_order(c["ctx"][m], p["o"], D, damp)
        no, ni = obs_order(c["act"][m], p["d"], 1, damp)
        out.append((ho, hi, no, ni))
    return out


def obs_keep(plan, heads, neurons):
    return ([np.array(ho[len(ho) - h:]) for (ho, _, _, _), h in zip(plan, heads)],
            [np.array(no[len(no) - n:]) for (_, _, no, _), n in zip(plan, neurons)])


def obs_global(plan, caps, mask, budget, norm="residual", min_heads=1, min_neurons=64):
    """Global allocation: removal steps of every module ranked by error increase (monotone along
    each module's order) per MAC saved; remove until the budget is met."""
    steps = []
    for l, ((ho, hi, no, ni), c) in enumerate(zip(plan, caps)):
        scale = 1.0
        if norm == "residual":
            scale = float((rows(c["x"], mask) ** 2).sum(1).mean())
        for kind, order, incs, cost, floor in (("h", ho, hi, HEAD_MACS, min_heads), ("n", no, ni, NEURON_MACS, min_neurons)):
            run = 0.0
            for step, inc in enumerate(incs[:len(incs) - floor]):
                run = max(run, inc)
                steps.append((run / scale / cost, l, kind))
    steps.sort()
    spent = BASE_MACS
    heads, neurons = [H] * L, [F] * L
    for _, l, kind in steps:
        if spent <= budget * BASE_MACS:
            break
        if kind == "h":
            heads[l] -= 1
            spent -= HEAD_MACS
        else:
            neurons[l] -= 1
            spent -= NEURON_MACS
    return heads, neurons


def sequential_refit(emb, teacher_caps, student, ids, mask, target, mode, folds=4, which=("o", "d"),
                     teacher_full=None):
    """Front to back: the student's own inputs, the teacher's outputs (target 'layer': the linear's
    own output; 'residual': the teacher's residual sum minus the student's residual input)."""
    x = embed(emb, ids)
    am = addmask_of(mask)
    m = mask.bool()
    sent = np.repeat(np.arange(ids.shape[0]) % folds, mask.sum(1).numpy())
    chosen = []
    out = []
    for p, c in zip(student, teacher_caps):
        p = dict(p)
        if "qkv" in which and p["heads"] > 0:
            for n in ("q", "k", "v"):
                tw = teacher_full[len(out)]
                Y = (c["x"] @ tw[n].T + tw[n + "b"])[:, :, p["cols"]][m]
                p[n], p[n + "b"], lam = refit(x[m], Y, p[n], p[n + "b"], sent, mode)
        ctx, a = attention(p, x, am)
        if "o" in which and p["heads"] > 0:
            Y = c["a"][m] if target == "layer" else (c["a"] + c["x"])[m] - x[m]
            p["o"], p["ob"], lam = refit(ctx[m], Y, p["o"], p["ob"], sent, mode)
            chosen.append(lam)
            a = ctx @ p["o"].T + p["ob"]
        h1 = ln(a + x, p["ln1w"], p["ln1b"])
        if "i" in which:
            tw = teacher_full[len(out)]
            Y = (c["h1"] @ tw["i"].T + tw["ib"])[:, :, p["neurons"]][m]
            p["i"], p["ib"], lam = refit(h1[m], Y, p["i"], p["ib"], sent, mode)
        act = torch.nn.functional.gelu(h1 @ p["i"].T + p["ib"])
        if "d" in which:
            Y = c["f"][m] if target == "layer" else (c["f"] + c["h1"])[m] - h1[m]
            p["d"], p["db"], lam = refit(act[m], Y, p["d"], p["db"], sent, mode)
            chosen.append(lam)
        f = act @ p["d"].T + p["db"]
        x = ln(f + h1, p["ln2w"], p["ln2b"])
        out.append(p)
    return out, chosen


def cosine(a, b):
    return float((a * b).sum(1).mean()), float((a * b).sum(1).min())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--held", type=int, default=100)
    ap.add_argument("--exp", default="criteria")
    args = ap.parse_args()
    torch.set_num_threads(1)
    s = stdlib_sentences()
    ci = {k: torch.from_numpy(v) for k, v in minilm_inputs(s[:args.calib]).items()}
    hi = {k: torch.from_numpy(v) for k, v in minilm_inputs(s[-args.held:]).items()}
    emb, teacher = weights()
    with torch.no_grad():
        ref_c, caps = forward(emb, teacher, ci["input_ids"], ci["attention_mask"], capture=True)
        ref_h, _ = forward(emb, teacher, hi["input_ids"], hi["attention_mask"])
        mask = ci["attention_mask"]

        def evaluate(layers, tag, **extra):
            e, _ = forward(emb, layers, hi["input_ids"], hi["attention_mask"])
            ec, _ = forward(emb, layers, ci["input_ids"], ci["attention_mask"])
            print(json.dumps({"tag": tag, "macs": round(macs(layers), 4), "held": round(cosine(ref_h, e)[0], 4),
                              "held_min": round(cosine(ref_h, e)[1], 4), "calib": round(cosine(ref_c, ec)[0], 4),
                              "heads": [p["heads"] for p in layers], "ffn": [p["i"].shape[0] for p in layers],
                              **extra}), flush=True)

        evaluate(teacher, "teacher")
        exps = args.exp.split(",")
        if "criteria" in exps:
            for crit in ("flap", "wanda", "second"):
                sc = scores(caps, teacher, mask, crit)
                for hh, nn in ((12, 1152), (12, 768), (8, 1152)):
                    st = prune(teacher, caps, mask, *uniform(sc, hh, nn))
                    evaluate(st, f"{crit} uniform h{hh} f{nn}")
        if "alloc" in exps:
            for crit in ("flap", "second"):
                sc = scores(caps, teacher, mask, crit)
                for norm in ("none", "residual", "sum"):
                    for budget in (0.70, 0.80):
                        st = prune(teacher, caps, mask, *global_alloc(sc, budget, norm, caps, mask))
                        evaluate(st, f"{crit} global-{norm} {budget}")
        if "obs" in exps:
            t0 = time.perf_counter()
            plan = obs_plan(caps, teacher, mask)
            print("obs plan", round(time.perf_counter() - t0, 1), "s", flush=True)
            sc = scores(caps, teacher, mask, "flap")
            configs = [("obs uniform", obs_keep(plan, [12] * L, [1152] * L)),
                       ("flap uniform", uniform(sc, 12, 1152)),
                       ("obs uniform", obs_keep(plan, [8] * L, [1152] * L)),
                       ("flap uniform", uniform(sc, 8, 1152))]
            for budget in (0.70, 0.75):
                for norm in ("residual", "none"):
                    hs, ns = obs_global(plan, caps, mask, budget, norm)
                    configs.append((f"obs global-{norm} {budget}", obs_keep(plan, hs, ns)))
                configs.append((f"flap global-none {budget}", global_alloc(sc, budget, "none", caps, mask)))
            for tag, keep in configs:
                st = prune(teacher, caps, mask, *keep)
                evaluate(st, tag)
                t0 = time.perf_counter()
                st, lams = sequential_refit(emb, caps, st, ci["input_ids"], mask, "residual", "cv")
                evaluate(st, tag + " +refit", sec=round(time.perf_counter() - t0, 1))
        if "more" in exps:
            sc = scores(caps, teacher, mask, "flap")
            for budget in (0.70,):
                base = prune(teacher, caps, mask, *global_alloc(sc, budget, "none", caps, mask))
                for which in (("o", "d"), ("qkv", "o", "i", "d"), ("o", "i", "d")):
                    for target in ("layer", "residual"):
                        st, _ = sequential_refit(emb, caps, base, ci["input_ids"], mask, target, "cv", which=which,
                                                 teacher_full=teacher)
                        evaluate(st, f"flap global {budget} refit {'+'.join(which)} {target}")
        if "cal70" in exps:      # the same plan with more calibration text (--calib)
            sc = scores(caps, teacher, mask, "flap")
            base = prune(teacher, caps, mask, *global_alloc(sc, 0.70, "none", caps, mask))
            evaluate(base, "flap global 0.7")
            st, _ = sequential_refit(emb, caps, base, ci["input_ids"], mask, "layer", "cv")
            evaluate(st, "flap global 0.7 refit o+d layer")
        if "frontier" in exps:
            sc = scores(caps, teacher, mask, "flap")
            for budget in (0.75, 0.80, 0.85):
                base = prune(teacher, caps, mask, *global_alloc(sc, budget, "none", caps, mask))
                evaluate(base, f"flap global {budget}")
                st, _ = sequential_refit(emb, caps, base, ci["input_ids"], mask, "layer", "cv")
                evaluate(st, f"flap global {budget} refit o+d layer")
        if "qk" in exps:        # query/key rank per head, alone and with the global allocation
            for r in (24, 16, 12, 8):
                for whiten in (True, False):
                    evaluate([qk_factor(p, c, mask, r, whiten) for p, c in zip(teacher, caps)],
                             f"qk rank {r} {'whitened' if whiten else 'plain'}")
            sc = scores(caps, teacher, mask, "flap")
            for budget in (0.70, 0.78):
                base = prune(teacher, caps, mask, *global_alloc(sc, budget, "none", caps, mask))
                st, _ = sequential_refit(emb, caps, base, ci["input_ids"], mask, "layer", "cv")
                evaluate(st, f"flap global {budget} refit")
                for r in (16, 12):
                    qk = [qk_factor(p, c, mask, r) for p, c in zip(base, caps)]
                    st, _ = sequential_refit(emb, caps, qk, ci["input_ids"], mask, "layer", "cv")
                    evaluate(st, f"flap global {budget} + qk rank {r} refit")
        if "refit" in exps:
            sc = scores(caps, teacher, mask, "flap")
            for hh, nn in ((12, 1152), (8, 1152), (12, 768)):
                base = prune(teacher, caps, mask, *uniform(sc, hh, nn))
                for target in ("layer", "residual"):
                    for mode in ("cv", "0.01"):
                        t0 = time.perf_counter()
                        st, lams = sequential_refit(emb, caps, base, ci["input_ids"], mask, target, mode)
                        evaluate(st, f"h{hh} f{nn} refit {target} {mode}", lams=lams,
                                 sec=round(time.perf_counter() - t0, 1))


if __name__ == "__main__":
    main()
