"""Experiment: decomposing the Linear (Conv1D) layers of a small GPT-2 trained on a procedurally generated text,
weight SVD against data-aware, with the perplexity change next to the parameter and FLOP reduction.

The text is built here (no download): sentences drawn from a small seeded grammar (subjects, verbs, objects,
adverbs, clauses joined by commas and "and"), tokenised by character. A GPT-2 (Hugging Face transformers,
2 layers, width 128, 4 heads, context 64) is trained briefly with AdamW, then every Conv1D of its blocks is
decomposed by ``rankprune.decompose`` at each ``target_params`` (the tied LM head is skipped: its weight is the
embedding) without data (weight SVD) and with 8 calibration batches of token ids (``{"input_ids": ...}``). Reported:
validation perplexity, parameters and FLOPs kept.

    python benchmarks/exp_gpt2_decompose.py
"""
import argparse
import math
import random
import sys
import time

import torch

import rankprune
from rankprune.benchmark import environment, markdown_table, write_results

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the robot", "a small bird", "the teacher", "we", "they"]
VERBS = ["sees", "likes", "builds", "paints", "follows", "finds", "carries", "watches", "remembers"]
OBJECTS = ["the red ball", "a green house", "the river", "an apple", "the bright moon", "a wooden box", "the garden"]
ADVERBS = ["slowly", "today", "again", "at night", "with care", "in the morning", "quietly"]


def sentence(rng: random.Random) -> str:
    clause = lambda: f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    parts = [clause()]
    while rng.random() < 0.4:
        parts.append(rng.choice([", and ", " because ", " while "]) + clause())
    if rng.random() < 0.6:
        parts.append(" " + rng.choice(ADVERBS))
    text = "".join(parts)
    return text[0].upper() + text[1:] + ". "


def build_text(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    out = []
    while sum(map(len, out)) < n_chars:
        out.append(sentence(rng))
    return "".join(out)[:n_chars]


def batches(ids: torch.Tensor, context: int, batch: int, count: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        starts = torch.randint(0, ids.numel() - context - 1, (batch,), generator=gen)
        yield torch.stack([ids[s:s + context + 1] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, context: int) -> float:
    model.eval()
    windows = ids[: (ids.numel() - 1) // context * context + 1]
    x = windows[:-1].reshape(-1, context)
    y = windows[1:].reshape(-1, context)
    logits = model(input_ids=x).logits
    return math.exp(float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--targets", default="0.9,0.8,0.7", help="target_params fractions")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import transformers

    torch.manual_seed(0)
    train_text, valid_text = build_text(200_000, seed=1), build_text(20_000, seed=2)
    chars = sorted(set(train_text + valid_text))
    encode = lambda t: torch.tensor([chars.index(c) for c in t])
    train_ids, valid_ids = encode(train_text), encode(valid_text)
    context = 64
    config = transformers.GPT2Config(vocab_size=len(chars), n_positions=context, n_embd=128, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    start = time.perf_counter()
    model.train()
    for chunk in batches(train_ids, context, 32, args.steps, seed=0):
        loss = model(input_ids=chunk[:, :-1], labels=chunk[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    train_s = time.perf_counter() - start
    dense_ppl = perplexity(model, valid_ids, context)
    print(f"trained {args.steps} steps in {train_s:.0f} s; validation perplexity {dense_ppl:.3f}", flush=True)
    calib = [{"input_ids": c[:, :-1]} for c in batches(train_ids, context, 16, 8, seed=3)]
    rows = [{"method": "dense", "target_params": 1.0, "perplexity": dense_ppl, "params_kept": 1.0, "flops_kept": 1.0,
             "layers": 0}]
    for target in [float(t) for t in args.targets.split(",")]:
        for method, data in (("weight-svd", None), ("data-aware", calib)):
            net, plan, rep = rankprune.decompose(model, target_params=target, data=data,
                                                 example_inputs=calib[0], include="transformer.h.*",
                                                 progress=False)
            total = rep["total"]
            rows.append({"method": method, "target_params": target, "perplexity": perplexity(net, valid_ids, context),
                         "params_kept": total["params"] / total["params_dense"],
                         "flops_kept": total["flops"] / total["flops_dense"], "layers": len(plan["layers"])})
            print(rows[-1], flush=True)
    headers = ["method", "target_params", "perplexity", "params_kept", "flops_kept", "layers"]
    md = (f"GPT-2 (2 layers, width 128, char-level, vocabulary {len(chars)}), trained {args.steps} steps on a "
          f"generated text; validation perplexity, whole-model parameters and FLOPs kept (context {context}).\n\n"
          + markdown_table(headers, [[r[h] for h in headers] for r in rows]) + "\n")
    print(md)
    path = write_results("exp_gpt2_decompose", {"environment": environment("cpu"), "steps": args.steps,
                                                "rows": rows, "markdown": md}, args.out)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
