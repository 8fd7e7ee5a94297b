"""Do the shipped sentence encoder's vectors tie slot values to their label descriptions?

A probe for label semantics at 1 shot (methods that use label names, such as Hou et al.'s
L-TapNet, gain most there). all-MiniLM-L6-v2 is a sentence-similarity model, so its
mean-pooled vector of a slot value read on its own ("taylor swift") might lie nearer the
description of its label ("artist") than of the domain's other labels. Per SNIPS domain,
on the gold slots of SNIPS train (at most 1,500 per domain, in file order):

- zero-shot label accuracy: the value's vector against the descriptions of the domain's
  slot labels (`snips_fewshot/slot_description`), the nearest one taken;
- slot against non-slot AUC: how often a gold value's best description similarity beats
  that of a random non-slot span of 1-3 words (one per utterance, seed 0).

Chance for the accuracy is one over the domain's label count; for the AUC 0.5.

    /work/peers-venv/bin/python benches/peers/label_description_probe.py
"""
import argparse
import collections
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="../shared/models/all-minilm-l6-v2")
parser.add_argument("--snips", default="../shared/data/snips/train")
parser.add_argument("--descriptions", default="../shared/data/snips_fewshot/slot_description")
args = parser.parse_args()
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
model = AutoModel.from_pretrained(args.model, local_files_only=True).eval()


def embed(texts):
    """Masked mean pooling, L2-normalized (how the model is meant to be used)."""
    out = []
    for i in range(0, len(texts), 256):
        batch = tok(texts[i : i + 256], padding=True, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        v = (hidden * mask).sum(1) / mask.sum(1)
        out.append(torch.nn.functional.normalize(v, dim=-1).numpy())
    return np.concatenate(out)


descriptions = dict(line.strip().split(" : ", 1) for line in open(args.descriptions) if " : " in line)
read = lambda name: open(os.path.join(args.snips, name)).read().split("\n")
labels_of = collections.defaultdict(set)
slots = collections.defaultdict(list)
non_slots = collections.defaultdict(list)
rng = random.Random(0)
for text, tags, intent in zip(read("seq.in"), read("seq.out"), read("label")):
    words, tags = text.split(), tags.split()
    if not words or len(words) != len(tags):
        continue
    i = 0
    while i < len(tags):
        if tags[i].startswith("B-"):
            label, j = tags[i][2:], i + 1
            while j < len(tags) and tags[j] == "I-" + label:
                j += 1
            slots[intent].append((" ".join(words[i:j]), label))
            labels_of[intent].add(label)
            i = j
        else:
            i += 1
    a = rng.randrange(len(words))
    b = min(len(words), a + rng.randint(1, 3))
    if all(t == "O" for t in tags[a:b]):
        non_slots[intent].append(" ".join(words[a:b]))

for domain in sorted(slots):
    labels = sorted(labels_of[domain])
    label_vectors = embed([descriptions.get(l, l.replace("_", " ")) for l in labels])
    gold = slots[domain][:1500]
    sims = embed([value for value, _ in gold]) @ label_vectors.T
    accuracy = np.mean([labels[p] == l for p, (_, l) in zip(sims.argmax(1), gold)])
    negative = (embed(non_slots[domain][:1000]) @ label_vectors.T).max(1)
    auc = np.mean(sims.max(1)[:, None] > negative[None, :])
    print(f"{domain:22s} labels {len(labels):2d}  zero-shot label accuracy {accuracy:.3f}  slot vs non-slot AUC {auc:.3f}")
