#!/usr/bin/env python3
"""PyTorch peer for the training-step benchmark: the time of one training step of the
reference stack (HF transformers AutoModel/BertModel, float32, train mode, dropout,
torch.optim.AdamW) on all-MiniLM-L6-v2 loaded from a local folder.

The batch: the first --batch non-blank lines of --texts, tokenized with
padding="max_length", truncation=True, max_length=--tokens (every text exactly
--tokens positions, [CLS] and [SEP] included). The step: forward in train mode
(hidden and attention dropout both --dropout), masked mean pooling over the real
tokens, L2 normalization, cosine similarities of every pair divided by
--temperature, cross-entropy with each sentence's own row as target (in-batch
InfoNCE), backward, AdamW step (lr --lr, weight decay 0.01, betas 0.9/0.999,
eps 1e-8; PyTorch's default foreach implementation), zero_grad(set_to_none=True).
This is exactly what `nearspan bench train-step` does on its side.

Before timing, the loss is computed once without dropout (model.eval(), no grad):
the Rust side compares it with its own. After --warmup untimed steps it times
--steps steps and prints ONE JSON line on stdout: median step seconds and its
forward (model + loss), backward and optimizer parts, tokens/s
(batch x tokens / step: padded positions, the work computed), the per-step times
and losses.

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
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=24, help="positions per text, [CLS]/[SEP] included")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--temperature", type=float, default=0.05)
    a = p.parse_args(argv)
    if a.batch < 2 or a.tokens < 3 or a.threads < 1 or a.warmup < 0 or a.steps < 1:
        p.error("need --batch >= 2, --tokens >= 3, --threads >= 1, --warmup >= 0, --steps >= 1")
    if not 0.0 <= a.dropout < 1.0:
        p.error("--dropout must be in [0, 1)")
    return a


def main(argv=None):
    args = parse_args(argv)

    # Offline, and thread counts pinned before torch / tokenizers start their pools.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(args.threads))
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with open(args.texts, encoding="utf-8") as f:
        texts = [line.strip() for line in f]
    texts = [t for t in texts if t][: args.batch]
    if len(texts) < args.batch:
        sys.exit(f"{args.texts}: fewer than {args.batch} texts")

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    config.hidden_dropout_prob = args.dropout
    config.attention_probs_dropout_prob = args.dropout
    model = AutoModel.from_pretrained(args.model, config=config, local_files_only=True).float()

    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=args.tokens, return_tensors="pt")
    assert enc["input_ids"].shape == (args.batch, args.tokens), enc["input_ids"].shape
    mask = enc["attention_mask"].unsqueeze(-1).float()
    targets = torch.arange(args.batch)

    def loss_fn():
        hidden = model(**enc).last_hidden_state
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
        z = pooled / pooled.pow(2).sum(dim=-1, keepdim=True).sqrt()
        sims = z @ z.t() / args.temperature
        return F.cross_entropy(sims, targets)

    model.eval()
    with torch.no_grad():
        loss_no_dropout = float(loss_fn())
    model.train()

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    steps, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = loss_fn()
        value = float(loss)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if i >= args.warmup:
            steps.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
            losses.append(value)

    s = np.array(steps)
    med = np.percentile(s, 50, axis=0)  # numpy's linear interpolation, as the Rust side
    step = float(med[3])
    result = {
        "peer": "pytorch",
        "impl": f"pytorch {torch.__version__} + transformers {transformers.__version__}, f32, cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "batch": args.batch,
        "tokens": args.tokens,
        "real_tokens": int(enc["attention_mask"].sum()),
        "step_s": round(step, 4),
        "forward_s": round(float(med[0]), 4),
        "backward_s": round(float(med[1]), 4),
        "optimizer_s": round(float(med[2]), 4),
        "step_s_all": [round(float(x), 4) for x in s[:, 3]],
        "tokens_per_s": round(args.batch * args.tokens / step, 1),
        "loss_no_dropout": loss_no_dropout,
        "losses": [round(x, 5) for x in losses],
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
