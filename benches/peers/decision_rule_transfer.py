"""Does a decision rule fitted on one few-shot domain carry to another? Dev data only.

`nearspan bench fewshot --dump-evidence FILE --dev-episodes 100` writes, per fold, the
retrieval evidence of every query span of the fold's dev-domain episodes (that fold's
encoder and detector). This script fits a rule on fold j's dev episodes 1-50 and scores
it on fold i's dev episodes 51-100 for every i != j (another domain, another encoder),
against the hand-set rule chosen on fold j's dev episodes 1-50 (the settings `bench
fewshot` printed, read from its log) scored the same way. It is how the slot scorer's
features were chosen (BENCHMARKS.md, "A learned decision rule"); the target domains are
never read.

    python benches/peers/decision_rule_transfer.py EVIDENCE.tsv BENCH.log \
        --features own|own+width|own+neighbours|all --hidden 0|16

`own`: the span's own evidence, what `src/scorer.rs` uses (best slot similarity s,
non-slot similarity o and whether there is one, s - o, the margin over the second label
and whether there is one, the detector logit z and sigmoid(z)); `width`: a one-hot of
the width (1..8+); `neighbours`: the same four numbers (present, z, s - o, s) for the
spans one word longer or shorter at either end; `all` adds the place in the utterance.
`--hidden 0` is logistic regression. Fitting: full-batch Adam, lr 1e-2, 300 epochs,
weight decay 1e-4 (the Rust scorer's settings); the lowest logit is chosen on the
fitting episodes.

`--fit-episodes N` fits on each fold's first N dev episodes and scores on the rest (50
for a 100-episode dump; 25 for the 50 episodes `--dev-skip 10 --episodes 1` dumps).
`--pooled` also fits one rule on the fitting episodes of every fold but the scored one
(six dev domains instead of one) and reports it beside the one-domain rules.
"""
import argparse
import collections
import re

import numpy as np
import torch

WMAX = 8
MIN_LOGITS = [-3, -2, -1.5, -1, -0.5, 0, 0.5, 1]


def load(path):
    cands, gold = collections.defaultdict(list), collections.defaultdict(list)
    for line in open(path):
        p = line.rstrip("\n").split("\t")
        key = (int(p[0]), int(p[1]), int(p[2]))
        if p[3] == "GOLD":
            gold[key].append((int(p[4]), int(p[5]), p[6]))
        else:
            f = lambda x: float(x)
            cands[key].append((int(p[4]), int(p[5]), p[6], f(p[7]), f(p[8]), f(p[9]), f(p[10]), p[11], int(p[3])))
    keys = sorted(set(cands) | set(gold))
    by_episode = collections.defaultdict(list)
    for k in keys:
        by_episode[(k[0], k[1])].append(k)
    return cands, gold, by_episode


def load_keys(path):
    for line in open(path):
        p = line.split("\t", 3)
        yield int(p[0]), int(p[1])


def sig(x):
    return 1 / (1 + np.exp(-x))


def greedy(scored):
    scored.sort(key=lambda x: (-x[0], x[1], x[2]))
    chosen = []
    for r, s, e, l in scored:
        if all(e <= cs or s >= ce for _, cs, ce, _ in chosen):
            chosen.append((r, s, e, l))
    return [(s, e, l) for _, s, e, l in chosen]


def hand_set_rule(cands, t, m, pen, w):
    """`labeler::decide`: threshold, non-slot margin, penalty and detector weight."""
    out = []
    for s, e, l1, s1, s2, o, z, gold, n in cands:
        if l1 == "-":
            continue
        sc = s1 + (w * (sig(z) - 0.5) if not np.isnan(z) else 0)
        if sc >= t and (np.isnan(o) or sc + m > o):
            out.append((sc - pen * (0 if np.isnan(o) else o), s, e, l1))
    return greedy(out)


def episode_f1(data, fold, ep, decide):
    cands, gold, by_episode = data
    tp = fp = fn = 0
    for k in by_episode[(fold, ep)]:
        pred, g = set(decide(cands[k], k)), set(gold[k])
        tp += len(pred & g)
        fp += len(pred - g)
        fn += len(g - pred)
    return 0.0 if tp == 0 else 100 * 2 * tp / (2 * tp + fp + fn)


def clamp_z(z):
    return 0.0 if np.isnan(z) else float(np.clip(z, -30, 30))


def features(c, by_span, which):
    s, e, l1, s1, s2, o, z, gold, n = c
    oo = 0.0 if np.isnan(o) else o
    second = s1 if np.isnan(s2) else s2
    zz = clamp_z(z)
    x = [s1, oo, float(not np.isnan(o)), s1 - oo, s1 - second, float(not np.isnan(s2)), zz, sig(zz)]
    if which in ("own+width", "all"):
        x += [1.0 if min(e - s, WMAX) == i else 0.0 for i in range(1, WMAX + 1)]
    if which == "all":
        x += [float(s == 0), float(e == n), n / 20]
    if which in ("own+neighbours", "all"):
        for a, b in [(s - 1, e), (s, e + 1), (s + 1, e), (s, e - 1)]:
            d = by_span.get((a, b)) if a < b else None
            if d is None:
                x += [0.0, 0.0, 0.0, 0.0]
                continue
            ns1 = 0.0 if np.isnan(d[3]) else d[3]
            no = 0.0 if np.isnan(d[5]) else d[5]
            x += [1.0, clamp_z(d[6]), ns1 - no, ns1]
    return x


def rows(data, fold, episodes, which):
    cands, _, by_episode = data
    X, Y, idx = [], [], []
    for ep in episodes:
        for k in by_episode[(fold, ep)]:
            by_span = {(c[0], c[1]): c for c in cands[k]}
            for i, c in enumerate(cands[k]):
                if c[2] == "-":
                    continue
                X.append(features(c, by_span, which))
                Y.append(1.0 if c[7] == c[2] else 0.0)
                idx.append((k, i))
    return torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32), idx


def fit(X, Y, hidden):
    torch.manual_seed(0)
    mu, sd = X.mean(0), X.std(0) + 1e-6
    net = (torch.nn.Sequential(torch.nn.Linear(X.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
           if hidden else torch.nn.Linear(X.shape[1], 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    Xn = (X - mu) / sd
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(net(Xn).squeeze(1), Y).backward()
        opt.step()
    return lambda X: net((X - mu) / sd).squeeze(1).detach().numpy()


def learned_f1(data, fold, episodes, logits, min_logit):
    def decide(cands, k):
        return greedy([(logits[(k, i)], c[0], c[1], c[2]) for i, c in enumerate(cands)
                       if c[2] != "-" and logits[(k, i)] > min_logit])
    return np.mean([episode_f1(data, fold, ep, decide) for ep in episodes])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("evidence")
    ap.add_argument("bench_log", help="the log of the same `bench fewshot` run (its chosen settings)")
    ap.add_argument("--features", default="own", choices=["own", "own+width", "own+neighbours", "all"])
    ap.add_argument("--hidden", type=int, default=0)
    ap.add_argument("--fit-episodes", type=int, default=50)
    ap.add_argument("--pooled", action="store_true")
    a = ap.parse_args()
    n_eps = 1 + max(k[1] for k in load_keys(a.evidence))
    fit_eps, score_eps = range(a.fit_episodes), range(a.fit_episodes, n_eps)
    data = load(a.evidence)
    folds = sorted({k[0] for k in data[2]})
    chosen = {}
    pattern = r"on dev \w+: F1 [\d.]+ at threshold ([\d.]+), margin (-?[\d.]+), penalty ([\d.]+), detector ([\d.]+)"
    for line in open(a.bench_log):
        m = re.search(pattern, line)
        if m:
            chosen[len(chosen) + 1] = tuple(float(m.group(g)) for g in range(1, 5))
    def fit_on(fs):
        parts = [rows(data, j, fit_eps, a.features) for j in fs]
        f = fit(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), a.hidden)
        logits = [dict(zip(p[2], f(p[0]))) for p in parts]
        return f, max(MIN_LOGITS, key=lambda t: np.mean([learned_f1(data, j, fit_eps, lg, t) for j, lg in zip(fs, logits)]))
    fitted = {j: fit_on([j]) for j in folds}
    learned, hand, pooled = [], [], []
    for i in folds:
        X, _, idx = rows(data, i, score_eps, a.features)
        score = lambda fm: learned_f1(data, i, score_eps, dict(zip(idx, fm[0](X))), fm[1])
        for j in folds:
            if i == j:
                continue
            t, m, pen, w = chosen[j]
            learned.append(score(fitted[j]))
            hand.append(np.mean([episode_f1(data, i, ep, lambda c, k: hand_set_rule(c, t, m, pen, w)) for ep in score_eps]))
        if a.pooled:
            pooled.append(score(fit_on([j for j in folds if j != i])))
    print(f"features {a.features}, hidden {a.hidden}: mean F1 over {len(learned)} (fitted on, scored on) fold pairs: "
          f"learned {np.mean(learned):.2f}, hand-set {np.mean(hand):.2f}"
          + (f"; fitted on the other {len(folds) - 1} folds together: {np.mean(pooled):.2f}" if a.pooled else ""))


if __name__ == "__main__":
    main()
