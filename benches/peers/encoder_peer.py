#!/usr/bin/env python3
"""PyTorch peer for the encoder benchmark: sentence-encoding throughput of the
reference stack (HF transformers AutoTokenizer + AutoModel/BertModel, float32,
eval mode, torch.inference_mode) on all-MiniLM-L6-v2 loaded from a local folder.

What it measures: the texts of --texts are taken in order (wrapping around) in
batches of --batch; each batch is tokenized with dynamic padding (padding=True),
run through the model, and mean-pooled (masked mean) and L2-normalized into
sentence vectors. After --warmup untimed batches it loops until at least
--seconds have elapsed, and prints ONE JSON line on stdout:
end-to-end throughput (tokenize + forward + pooling, what a user's stack pays),
per-batch latency p50/p99, and forward-only throughput
("forward_sentences_per_s": the model call alone, tokenization and pooling left out).
"tokens" counts real (non-pad) tokens, [CLS]/[SEP] included.

Nothing is downloaded: HF_HUB_OFFLINE=1 and local_files_only=True.
Only the Rust benchmark runs this script (see README.md beside it); tests and CI
never do, since it needs the venv described there.
"""

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local HF model folder")
    p.add_argument("--texts", required=True, help="file with one utterance per line")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up batches")
    p.add_argument("--seconds", type=float, default=5.0, help="minimum timed seconds")
    p.add_argument("--max", type=int, default=None, help="use only the first N texts")
    a = p.parse_args(argv)
    if a.batch < 1 or a.threads < 1 or a.warmup < 0 or a.seconds <= 0:
        p.error("--batch and --threads must be >= 1, --warmup >= 0, --seconds > 0")
    return a


def main(argv=None):
    args = parse_args(argv)

    # Offline, and thread counts pinned before torch / tokenizers start their pools.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(args.threads))
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))  # fast tokenizer
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if args.threads > 1 else "false")

    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)

    with open(args.texts, encoding="utf-8") as f:
        texts = [line.strip() for line in f]
    texts = [t for t in texts if t]
    if args.max is not None:
        texts = texts[: args.max]
    if not texts:
        sys.exit(f"no texts in {args.texts}")

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModel.from_pretrained(args.model, local_files_only=True)
    model = model.float().eval()

    n_texts = len(texts)
    pos = 0

    def next_batch():
        nonlocal pos
        b = [texts[(pos + k) % n_texts] for k in range(args.batch)]
        pos = (pos + args.batch) % n_texts
        return b

    def encode(batch):
        """Returns (sentence vectors, real tokens, forward seconds)."""
        enc = tokenizer(batch, padding=True, truncation=True, return_tensors="pt")
        f0 = time.perf_counter()
        hidden = model(**enc).last_hidden_state
        f1 = time.perf_counter()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        vecs = F.normalize(summed / counts, p=2, dim=1)
        return vecs, int(enc["attention_mask"].sum()), f1 - f0

    with torch.inference_mode():
        for _ in range(args.warmup):
            encode(next_batch())

        latencies = []
        sentences = tokens = 0
        forward_s = 0.0
        start = time.perf_counter()
        while True:
            b0 = time.perf_counter()
            _, ntok, fwd = encode(next_batch())
            b1 = time.perf_counter()
            latencies.append(b1 - b0)
            sentences += args.batch
            tokens += ntok
            forward_s += fwd
            if b1 - start >= args.seconds:
                break
        elapsed = time.perf_counter() - start

    lat_ms = np.array(latencies) * 1e3
    result = {
        "peer": "pytorch",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": args.threads,
        "batch": args.batch,
        "sentences": sentences,
        "tokens": tokens,
        "seconds": round(elapsed, 4),
        "sentences_per_s": round(sentences / elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 1),
        "latency_ms_p50": round(float(np.percentile(lat_ms, 50)), 3),
        "latency_ms_p99": round(float(np.percentile(lat_ms, 99)), 3),
        "forward_sentences_per_s": round(sentences / forward_s, 2),
        "batches": len(latencies),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
