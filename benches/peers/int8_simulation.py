"""How far int8 products would move all-MiniLM-L6-v2's vectors: a PyTorch simulation.

Every linear layer of the encoder gets int8 weights (one scale per output row) and
int8 activations (one dynamic scale per token, the max-abs rule an AVX512-VNNI kernel
would use), computed in float so only the rounding is simulated. Prints the cosine
similarity of token vectors and of mean-pooled sentence vectors against fp32 on the
first 200 SNIPS test utterances, the same numbers the bf16 tolerance test reports for
our bf16 path (token cosine worst 0.99996).

    /work/peers-venv/bin/python benches/peers/int8_simulation.py [--keep-ffn-down-f32] [--bf16]

`--keep-ffn-down-f32` leaves the feed-forward down projection (input: GELU outputs,
which have the largest outliers) unquantized.
"""
import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from transformers import AutoModel, AutoTokenizer

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="../shared/models/all-minilm-l6-v2")
parser.add_argument("--texts", default="../shared/data/snips/test/seq.in")
parser.add_argument("--n", type=int, default=200)
parser.add_argument("--keep-ffn-down-f32", action="store_true")
parser.add_argument("--bf16", action="store_true", help="simulate bf16 rounding instead (the comparison)")
args = parser.parse_args()
torch.set_num_threads(1)
tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
model = AutoModel.from_pretrained(args.model, local_files_only=True).eval()
texts = [l.strip() for l in open(args.texts) if l.strip()][: args.n]


def quantize_rows(x):
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(x / scale).clamp(-127, 127) * scale


def to_bf16(x):
    return x.to(torch.bfloat16).float()


def int8_forward(linear):
    if args.bf16:
        wb = to_bf16(linear.weight.data)
        return lambda x: torch.nn.functional.linear(to_bf16(x), wb, linear.bias)
    w8 = quantize_rows(linear.weight.data)
    return lambda x: torch.nn.functional.linear(quantize_rows(x), w8, linear.bias)


with torch.no_grad():
    batch = tok(texts, padding=True, return_tensors="pt")
    reference = model(**batch).last_hidden_state
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".layer." not in name:
            continue
        is_ffn_down = name.endswith("output.dense") and ".attention." not in name
        if args.keep_ffn_down_f32 and is_ffn_down:
            continue
        module.forward = int8_forward(module)
    quantized = model(**batch).last_hidden_state

mask = batch["attention_mask"].bool()
token_cos = torch.nn.functional.cosine_similarity(reference[mask], quantized[mask], dim=-1)
m = batch["attention_mask"].unsqueeze(-1).float()
sentence_cos = torch.nn.functional.cosine_similarity((reference * m).sum(1) / m.sum(1), (quantized * m).sum(1) / m.sum(1), dim=-1)
print(f"token cosine worst {token_cos.min().item():.5f} mean {token_cos.mean().item():.5f}; "
      f"sentence cosine worst {sentence_cos.min().item():.5f} mean {sentence_cos.mean().item():.5f} "
      f"({len(texts)} texts, {'bf16' if args.bf16 else 'int8'}, {'FFN down kept f32' if args.keep_ffn_down_f32 else 'every layer'})")
