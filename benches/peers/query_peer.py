#!/usr/bin/env python3
"""PyTorch peer for the end-to-end query benchmark: nearspan's retrieval labeler
written with the reference stack (HF transformers AutoTokenizer + AutoModel/BertModel,
float32, eval mode, torch.inference_mode) and numpy, on all-MiniLM-L6-v2 from a
local folder, timed on the same utterances as `nearspan bench query`.

The method, as in nearspan (src/labeler.rs, src/spans.rs, src/decode.rs,
src/encoder/pooling.rs), with its defaults:

- Words: JointBERT folders (seq.in / seq.out / label); the words of seq.in are
  split at whitespace and joined by one space; IOB2 tags give the gold slots.
- Encoding: one forward pass per utterance (batched, texts sorted by token count so
  that batches hold little padding, as nearspan's Encoder::encode does); words map to
  the sub-tokens whose start offset lies inside them.
- Candidate spans: every run of 1..=--max-width words (default 10). A span's vector is
  its first sub-token's vector concatenated with its last sub-token's vector
  (`start-end`, 768 dims), the concatenation L2-normalized (`mean` and
  `start-end-mean` are also accepted).
- Index (setup, untimed): the first --max-train labeled examples of --train; every
  gold slot span with its label, then every other candidate span labeled `O`; the
  utterance vectors (masked mean over all tokens, [CLS]/[SEP] included, normalized).
- Search: exact, numpy float32 matrix products, top --k per candidate span (ties by
  the lower id, as nearspan's exact backend); top --intent-k utterances per query.
- Decoding (greedy, the default): a span's label is the best non-O label among its
  neighbours; it is a candidate if that similarity >= --threshold and beats the best
  O neighbour (plus --o-margin); candidates by descending score (ties: earlier, then
  shorter span), each kept if it overlaps none kept before.
- Intent: the intent of the best utterance neighbour (`max`; `mean` also accepted),
  `oos` below --oos-threshold when given.
- Justifications: per slot, the best neighbour of each of its --explain best labels;
  for the intent, the --explain best utterance neighbours; as nearspan's query JSON.

It then times single-utterance queries (--single utterances of --test, cycling, one
at a time: tokenize, encode, pool, search, decode, build the justification dicts)
and the whole --test split labeled at once in encoder batches of --batch-size, and
prints ONE JSON line on stdout: query_p50_ms, query_p99_ms,
query_throughput_utt_per_s, setup time, index size, settings and versions.
--predictions-out writes the batched run's predictions, one query-JSON object per
line, which `nearspan bench query` compares with its own.

nearspan's index switches to HNSW (usearch, approximate) at 20,000 span vectors
(AUTO_EXACT_THRESHOLD in index/src/index.rs) when built with the default backend;
this peer always searches exactly and says which backend nearspan's default would
use at this index size ("nearspan_auto_span_backend").

Nothing is downloaded: HF_HUB_OFFLINE=1 and local_files_only=True.
Only the Rust benchmark runs this script (see README.md beside it); tests and CI
never do, since it needs the venv described there.
"""

import argparse
import json
import os
import sys
import time

O_LABEL = "O"
OUT_OF_SCOPE = "oos"
# nearspan-index: BackendKind::Auto searches exactly below this many vectors.
AUTO_EXACT_THRESHOLD = 20_000
# Largest query x index score matrix computed at once (floats): bounds memory.
SCORE_BUDGET = 1 << 25


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local HF model folder")
    p.add_argument("--train", required=True, help="JointBERT split folder the index is built from")
    p.add_argument("--test", required=True, help="JointBERT split folder of the utterances to label")
    p.add_argument("--max-train", type=int, default=None, help="index only the first N examples of --train")
    p.add_argument("--single", type=int, default=300, help="utterances timed one at a time")
    p.add_argument("--passes", type=int, default=1, help="batched passes over --test; the median pass's throughput is reported")
    p.add_argument("--warmup", type=int, default=8, help="untimed utterances labeled first (one batch)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per encoder batch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-width", type=int, default=10)
    p.add_argument("--pooling", default="start-end", choices=["start-end", "mean", "start-end-mean"])
    p.add_argument("--no-o-spans", action="store_true", help="do not index non-slot spans")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--o-margin", type=float, default=0.0)
    p.add_argument("--decoder", default="greedy", choices=["greedy"], help="only greedy is implemented")
    p.add_argument("--intent-k", type=int, default=10)
    p.add_argument("--intent-aggregation", default="max", choices=["max", "mean"])
    p.add_argument("--oos-threshold", type=float, default=None)
    p.add_argument("--explain", type=int, default=3)
    p.add_argument("--prefilter", type=int, default=None,
                   help="search spans only among the spans of the N examples nearest each utterance")
    p.add_argument("--predictions-out", default=None, help="write the batched run's predictions (JSONL)")
    a = p.parse_args(argv)
    if min(a.batch_size, a.threads, a.max_width, a.k, a.intent_k, a.passes) < 1 or min(a.single, a.warmup, a.explain) < 0:
        p.error("--batch-size, --threads, --max-width, --k, --intent-k, --passes must be >= 1; --single, --warmup, --explain >= 0")
    if a.max_train is not None and a.max_train < 1:
        p.error("--max-train must be >= 1")
    return a


# ---------------------------------------------------------------- data


def read_lines(path):
    """Lines without their newline; a final newline adds no empty line; BOM dropped."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        data = f.read()
    if data.endswith("\n"):
        data = data[:-1]
    if not data:
        return []
    return [line[:-1] if line.endswith("\r") else line for line in data.split("\n")]


def read_jointbert(folder, limit=None):
    """Examples of a JointBERT split folder: dicts with text, words [(start, end)] in
    characters, intent, and gold spans [(word_start, word_end, label)]."""
    ins, outs, labels = (read_lines(os.path.join(folder, f)) for f in ("seq.in", "seq.out", "label"))
    if not len(ins) == len(outs) == len(labels):
        sys.exit(f"{folder}: seq.in, seq.out and label have different line counts")
    if limit is not None:
        if limit > len(ins):
            sys.exit(f"{folder}: --max-train {limit} but only {len(ins)} examples")
        ins, outs, labels = ins[:limit], outs[:limit], labels[:limit]
    examples = []
    for line, (w_line, t_line, label) in enumerate(zip(ins, outs, labels), 1):
        words, tags = w_line.split(), t_line.split()
        if len(words) != len(tags) or not words:
            sys.exit(f"{folder}: line {line}: {len(words)} words, {len(tags)} tags")
        offsets, pos = [], 0
        for w in words:
            offsets.append((pos, pos + len(w)))
            pos += len(w) + 1
        spans, open_ = [], False
        for i, tag in enumerate(tags):
            if tag == "O":
                open_ = False
            elif tag.startswith("B-"):
                spans.append([i, i + 1, tag[2:]])
                open_ = True
            elif tag.startswith("I-") and open_ and spans[-1][2] == tag[2:]:
                spans[-1][1] = i + 1
            else:
                sys.exit(f"{folder}/seq.out: line {line}: bad IOB2 tag {tag!r} at word {i + 1}")
        examples.append(
            {"text": " ".join(words), "words": offsets, "intent": label.strip() or None, "spans": [tuple(s) for s in spans]}
        )
    return examples


def candidate_spans(n_words, max_width):
    """Every span of 1..=max_width words, ordered by start, then width."""
    return [(s, e) for s in range(n_words) for e in range(s + 1, min(s + max_width, n_words) + 1)]


def align_words(offsets, words):
    """For each word, the range of token indices whose start offset lies inside it
    ([CLS] and [SEP] skipped): TokenizedText::align_words."""
    ranges, t, last = [], 1, max(len(offsets) - 1, 0)
    for ws, we in words:
        while t < last and offsets[t][0] < ws:
            t += 1
        first = t
        while t < last and offsets[t][0] < we:
            t += 1
        ranges.append((first, t))
    return ranges


def main(argv=None):
    args = parse_args(argv)

    # Offline, and thread counts pinned before torch / numpy / tokenizers start their pools.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if args.threads > 1 else "false")

    import numpy as np
    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)

    setup_start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModel.from_pretrained(args.model, local_files_only=True).float().eval()
    hidden_size = model.config.hidden_size
    train = read_jointbert(args.train, args.max_train)
    test = read_jointbert(args.test)
    threshold, o_margin = np.float32(args.threshold), np.float32(args.o_margin)

    # ------------------------------------------------------------ encoder

    def tokenize(texts):
        """(input ids, character offsets) per text, with [CLS]/[SEP], unpadded."""
        enc = tokenizer(list(texts), add_special_tokens=True, return_offsets_mapping=True, truncation=False)
        return enc["input_ids"], enc["offset_mapping"]

    @torch.inference_mode()
    def encode(ids):
        """Last hidden state (tokens x hidden, float32 numpy) per text; texts are
        grouped by token count into batches of --batch-size, order kept."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [None] * len(ids)
        for c in range(0, len(order), args.batch_size):
            chunk = order[c : c + args.batch_size]
            width = max(len(ids[i]) for i in chunk)
            input_ids = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for row, i in enumerate(chunk):
                input_ids[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = 1
            hidden = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
            hidden = hidden.numpy()
            for row, i in enumerate(chunk):
                out[i] = hidden[row, : len(ids[i])]
        return out

    def normalize_rows(m):
        norms = np.sqrt(np.einsum("ij,ij->i", m, m))
        np.divide(m, norms[:, None], out=m, where=norms[:, None] > 0)
        return m

    def span_vectors(hidden, word_tokens, spans):
        """(spans x dim) pooled, L2-normalized span vectors; a span whose words have no
        sub-tokens gets a zero vector (spans::span_vectors + pooling::span_vector_into)."""
        n = len(spans)
        first = np.zeros(n, dtype=np.int64)
        last = np.zeros(n, dtype=np.int64)
        valid = np.zeros(n, dtype=bool)
        for i, (s, e) in enumerate(spans):
            covered = [r for r in word_tokens[s:e] if r[0] < r[1]]
            if covered:
                first[i], last[i], valid[i] = covered[0][0], covered[-1][1] - 1, True
        parts = []
        if args.pooling in ("start-end", "start-end-mean"):
            parts += [hidden[first], hidden[last]]
        if args.pooling in ("mean", "start-end-mean"):
            parts.append(np.stack([hidden[a : b + 1].mean(axis=0) for a, b in zip(first, last)]))
        v = np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)
        v[~valid] = 0.0
        return normalize_rows(v)

    def sentence_vectors(hidden):
        """Mean over all tokens ([CLS]/[SEP] included), L2-normalized."""
        return normalize_rows(np.stack([h.mean(axis=0) for h in hidden]).astype(np.float32))

    def utterance_words(ex, offsets):
        return align_words(offsets, ex["words"])

    # ------------------------------------------------------------ index (setup)

    ids, offsets = tokenize(ex["text"] for ex in train)
    hidden = encode(ids)
    label_ids, labels = {}, []

    def intern(label):
        if label not in label_ids:
            label_ids[label] = len(labels)
            labels.append(label)
        return label_ids[label]

    blocks, span_label, span_example, span_chars = [], [], [], []
    for e, (ex, h, off) in enumerate(zip(train, hidden, offsets)):
        gold = [(s, t) for s, t, _ in ex["spans"]]
        spans, names = list(gold), [lab for _, _, lab in ex["spans"]]
        if not args.no_o_spans:
            for c in candidate_spans(len(ex["words"]), args.max_width):
                if c not in gold:
                    spans.append(c)
                    names.append(O_LABEL)
        if spans:
            blocks.append(span_vectors(h, utterance_words(ex, off), spans))
        for (s, t), name in zip(spans, names):
            span_label.append(intern(name))
            span_example.append(e)
            span_chars.append((ex["words"][s][0], ex["words"][t - 1][1]))
    span_matrix = np.ascontiguousarray(np.concatenate(blocks), dtype=np.float32)
    span_label = np.asarray(span_label, dtype=np.int64)
    # Spans are stored grouped by example: example e's spans are rows span_start[e]:span_start[e + 1].
    span_start = np.searchsorted(np.asarray(span_example, dtype=np.int64), np.arange(len(train) + 1))
    utt_matrix = sentence_vectors(hidden)
    o_id = label_ids.get(O_LABEL, -1)
    del hidden, blocks
    setup_s = time.perf_counter() - setup_start

    # ------------------------------------------------------------ query

    def search(queries, matrix, k):
        """Top-k rows of `matrix` by dot product for each query row: (ids, similarities),
        best first, ties by the lower id."""
        n = matrix.shape[0]
        k = min(k, n)
        out_ids = np.empty((queries.shape[0], k), dtype=np.int64)
        out_sims = np.empty((queries.shape[0], k), dtype=np.float32)
        rows = max(1, SCORE_BUDGET // max(n, 1))
        for r0 in range(0, queries.shape[0], rows):
            scores = queries[r0 : r0 + rows] @ matrix.T
            if k < n:
                top = np.argpartition(scores, n - k, axis=1)[:, n - k :]
            else:
                top = np.broadcast_to(np.arange(n), scores.shape)
            sims = np.take_along_axis(scores, top, axis=1)
            order = np.lexsort((top, -sims), axis=1)
            out_ids[r0 : r0 + rows] = np.take_along_axis(top, order, axis=1)
            out_sims[r0 : r0 + rows] = np.take_along_axis(sims, order, axis=1)
        return out_ids, out_sims

    def span_neighbour(span_id, similarity):
        ex = train[span_example[span_id]]
        start, end = span_chars[span_id]
        return {
            "example": ex["text"],
            "text": ex["text"][start:end],
            "start": start,
            "end": end,
            "label": labels[span_label[span_id]],
            "similarity": float(similarity),
        }

    def decide_slots(ex, spans, nb_ids, nb_sims):
        """Greedy decoding of one utterance's candidate spans, with justifications."""
        nb_labels = span_label[nb_ids]
        candidates = []  # (score, span, by_label)
        for i, span in enumerate(spans):
            by_label, seen, o_score = [], set(), None
            for lab, sim, sid in zip(nb_labels[i].tolist(), nb_sims[i], nb_ids[i].tolist()):
                if lab in seen:
                    continue
                seen.add(lab)
                if lab == o_id:
                    o_score = sim
                else:
                    by_label.append((lab, sim, sid))
            if not by_label:
                continue
            score = by_label[0][1]
            if score >= threshold and (o_score is None or score + o_margin > o_score):
                candidates.append((score, span, by_label))
        candidates.sort(key=lambda c: (-c[0], c[1]))
        chosen = []
        for c in candidates:
            s, e = c[1]
            if all(e <= k[1][0] or k[1][1] <= s for k in chosen):
                chosen.append(c)
        chosen.sort(key=lambda c: c[1][0])
        slots = []
        for score, (s, e), by_label in chosen:
            start, end = ex["words"][s][0], ex["words"][e - 1][1]
            slots.append(
                {
                    "start": start,
                    "end": end,
                    "text": ex["text"][start:end],
                    "label": labels[by_label[0][0]],
                    "score": float(score),
                    "neighbours": [span_neighbour(sid, sim) for _, sim, sid in by_label[: args.explain]],
                }
            )
        return slots

    def decide_intent(utt_ids, utt_sims):
        per_intent = {}  # intent -> [score, count], in order of first appearance
        for i, sim in zip(utt_ids.tolist(), utt_sims):
            intent = train[i]["intent"]
            if intent is None:
                continue
            if intent in per_intent:
                entry = per_intent[intent]
                entry[1] += 1
                entry[0] = max(entry[0], sim) if args.intent_aggregation == "max" else entry[0] + sim
            else:
                per_intent[intent] = [sim, 1]
        if not per_intent:
            return None
        best, best_score = None, None
        for intent, (score, count) in per_intent.items():
            if args.intent_aggregation == "mean":
                score = score / np.float32(count)
            if best is None or score > best_score:
                best, best_score = intent, score
        if args.oos_threshold is not None and best_score < np.float32(args.oos_threshold):
            best = OUT_OF_SCOPE
        neighbours = [
            {
                "example": train[i]["text"],
                "text": train[i]["text"],
                "start": 0,
                "end": len(train[i]["text"]),
                "label": train[i]["intent"],
                "similarity": float(sim),
            }
            for i, sim in zip(utt_ids.tolist(), utt_sims)
            if train[i]["intent"] is not None
        ][: args.explain]
        return {"label": best, "score": float(best_score), "neighbours": neighbours}

    def label(examples, stages=None):
        """Labels examples end to end: tokenize, encode, pool, search, decode, justify.
        Adds the seconds of each stage to `stages` when given."""
        t0 = time.perf_counter()
        ids, offsets = tokenize(ex["text"] for ex in examples)
        hidden = encode(ids)
        t1 = time.perf_counter()
        all_spans, blocks, owners = [], [], []
        for j, (ex, h, off) in enumerate(zip(examples, hidden, offsets)):
            spans = candidate_spans(len(ex["words"]), args.max_width)
            all_spans.append(spans)
            if spans:
                blocks.append(span_vectors(h, utterance_words(ex, off), spans))
                owners.append(j)
        utt_ids, utt_sims = search(sentence_vectors(hidden), utt_matrix, max(args.intent_k, args.prefilter or 0))
        if blocks and args.prefilter:
            # Two-stage: each utterance's spans against the spans of its nearest examples.
            found = []
            for j, block in zip(owners, blocks):
                rows = np.concatenate([np.arange(span_start[e], span_start[e + 1]) for e in utt_ids[j, : args.prefilter]])
                ids, sims = search(block, span_matrix[rows], args.k)
                found.append((rows[ids], sims))
            nb_ids = np.concatenate([f[0] for f in found])
            nb_sims = np.concatenate([f[1] for f in found])
        elif blocks:
            nb_ids, nb_sims = search(np.concatenate(blocks), span_matrix, args.k)
        utt_ids, utt_sims = utt_ids[:, : args.intent_k], utt_sims[:, : args.intent_k]
        t2 = time.perf_counter()
        predictions, row = [], 0
        for j, (ex, spans) in enumerate(zip(examples, all_spans)):
            r = slice(row, row + len(spans))
            row += len(spans)
            slots = decide_slots(ex, spans, nb_ids[r], nb_sims[r]) if spans else []
            predictions.append({"text": ex["text"], "intent": decide_intent(utt_ids[j], utt_sims[j]), "slots": slots})
        if stages is not None:
            for name, s in (("encode", t1 - t0), ("pool_search", t2 - t1), ("decode", time.perf_counter() - t2)):
                stages.setdefault(name, []).append(s)
        return predictions

    with torch.inference_mode():
        label(test[: max(args.warmup, 1)])
        latencies, single_stages, batch_stages = [], {}, {}
        for i in range(args.single):
            t0 = time.perf_counter()
            label([test[i % len(test)]], single_stages)
            latencies.append(time.perf_counter() - t0)
        pass_rates = []
        for _ in range(args.passes):
            t0 = time.perf_counter()
            predictions = label(test, batch_stages)
            pass_rates.append(len(predictions) / (time.perf_counter() - t0))

    if args.predictions_out:
        with open(args.predictions_out, "w", encoding="utf-8") as f:
            for p in predictions:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")

    lat_ms = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    n_spans = span_matrix.shape[0]
    auto_backend = "exact" if n_spans < AUTO_EXACT_THRESHOLD else "hnsw (usearch)"
    result = {
        "peer": "pytorch+numpy",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "threads": args.threads,
        "query_p50_ms": round(float(np.percentile(lat_ms, 50)), 3),
        "query_p99_ms": round(float(np.percentile(lat_ms, 99)), 3),
        "query_throughput_utt_per_s": round(float(np.percentile(pass_rates, 50)), 2),
        "query_throughput_per_pass": [round(r, 2) for r in pass_rates],
        "utterances_single": len(latencies),
        "utterances_batched": len(predictions),
        "batch_size": args.batch_size,
        # Where the time goes: tokenize + encode, span pooling + both searches, decoding
        # + justifications. Single: median ms per utterance; batched: seconds in all passes.
        "single_stage_ms_p50": {k: round(float(np.median(v)) * 1e3, 3) for k, v in single_stages.items()},
        "batched_stage_s": {k: round(sum(v), 3) for k, v in batch_stages.items()},
        "setup_s": round(setup_s, 2),
        "index": {
            "train": os.path.abspath(args.train),
            "examples": len(train),
            "spans": n_spans,
            "dim": span_matrix.shape[1],
            "labels": len(labels),
            "search": "exact (numpy float32 matmul + argpartition)",
        },
        "nearspan_auto_span_backend": auto_backend,
        "settings": {
            "max_width": args.max_width,
            "pooling": args.pooling,
            "o_spans": not args.no_o_spans,
            "k": args.k,
            "threshold": args.threshold,
            "o_margin": args.o_margin,
            "decoder": args.decoder,
            "intent_k": args.intent_k,
            "intent_aggregation": args.intent_aggregation,
            "oos_threshold": args.oos_threshold,
            "explain": args.explain,
            "prefilter": args.prefilter,
        },
        "hidden_size": hidden_size,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }
    if args.prefilter:
        result["index"]["search"] = f"exact among the spans of the {args.prefilter} nearest examples (numpy)"
    elif auto_backend != "exact":
        result["note"] = (
            f"{n_spans} span vectors: nearspan's default (Auto) backend searches them with HNSW "
            "(usearch, approximate); this peer searches exactly"
        )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
