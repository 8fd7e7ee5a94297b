#!/usr/bin/env python3
"""Checks that the PyTorch peer stack reproduces /work/shared/fixtures/minilm_reference.json.

Encodes the fixture's sentences as one padded batch with an attention mask (as the
fixture was made), with HF transformers AutoTokenizer + AutoModel, float32, eval mode,
and prints the max abs difference of input_ids, last_hidden_state (non-pad rows) and
the mean-pooled L2-normalized vector against the fixture. Exits 1 if a difference
exceeds --tol (the fixture is rounded to 6 decimals, so ~5e-7 is the floor).
Offline only; run by hand with the venv of README.md, never by tests or CI.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_FIXTURE = os.path.normpath(os.path.join(HERE, "../../../shared/fixtures/minilm_reference.json"))
DEFAULT_MODEL = os.path.normpath(os.path.join(HERE, "../../../shared/models/all-minilm-l6-v2"))


def main(argv=None):
    p = argparse.ArgumentParser(description="compare the PyTorch peer with the MiniLM fixture")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--fixture", default=DEFAULT_FIXTURE)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tol", type=float, default=1e-4)
    args = p.parse_args(argv)

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)

    with open(args.fixture, encoding="utf-8") as f:
        fx = json.load(f)
    sents = fx["sentences"]
    texts = [s["text"] for s in sents]

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModel.from_pretrained(args.model, local_files_only=True).float().eval()

    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                    return_offsets_mapping=True)
    offsets = enc.pop("offset_mapping")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), p=2, dim=1)

    ok = True
    worst_h = worst_p = 0.0
    for i, s in enumerate(sents):
        n = int(enc["attention_mask"][i].sum())
        ids = enc["input_ids"][i, :n].tolist()
        ids_ok = ids == s["input_ids"]
        offs = [list(o) for o in offsets[i, :n].tolist()]
        offs_ok = offs == [list(o) for o in s["offsets"]]
        dh = (hidden[i, :n] - torch.tensor(s["last_hidden_state"])).abs().max().item() if ids_ok else float("inf")
        dp = (pooled[i] - torch.tensor(s["mean_pooled_normalized"])).abs().max().item()
        worst_h, worst_p = max(worst_h, dh), max(worst_p, dp)
        ok &= ids_ok and offs_ok and dh <= args.tol and dp <= args.tol
        print(f"sentence {i}: tokens={n} input_ids_match={ids_ok} offsets_match={offs_ok} "
              f"max_abs_diff last_hidden_state={dh:.3e} pooled={dp:.3e}")
    print(json.dumps({
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "max_abs_diff_last_hidden_state": worst_h,
        "max_abs_diff_pooled": worst_p,
        "tol": args.tol,
        "ok": ok,
    }))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
