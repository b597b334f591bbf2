"""Write tests/fixtures/packing/<family>.json: what PyTorch computes when the documents
of a packed sample are run *separately*, the truth a packed run must reproduce.

For each reference checkpoint (tests/fixtures/reference/<family>), the 24 `input_ids`
of its expected.json are cut into three documents (ids [0:9], [9:16], [16:24]). Each
document goes through the Hugging Face model alone (float32, eager attention, positions
0..len), and

    loss = sum over documents of sum over its next-token targets of cross-entropy

(8 + 6 + 7 = 21 targets: a document's last token predicts nothing). The JSON holds

    documents   the three id lists
    loss_sum    that loss
    targets     21
    grad_norms  {parameter: L2 norm of d loss_sum / d parameter} for every parameter
    grads       {parameter: flattened values} for a few small tensors: the first and
                final norm weights, and for learned positions the first 12 rows of the
                position table (rows 9.. get no gradient when positions restart)

keyed by the checkpoint's parameter names (as ref_grads.safetensors). A packed run
(`tests/it/packing.rs`) scores the 24 ids as one sample with document starts [9, 16]
and must match within 1e-4 (loss: absolute per target; gradients: relative).

Run: /root/venv/bin/python utils/make_packing_fixture.py
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "tests/fixtures/reference"
OUT = ROOT / "tests/fixtures/packing"
FAMILIES = ["llama", "mistral", "falcon", "gpt2", "gpt_neox", "gpt_neo"]
CUTS = [0, 9, 16, 24]
POSITION_ROWS = 12


def small_tensors(names):
    """The first and the final norm weights, and learned position tables."""
    norms = [n for n in names if n.endswith(".weight") and ("norm" in n or ".ln_" in n)]
    picked = [norms[0], norms[-1]] if norms else []
    picked += [n for n in names if n.endswith("wpe.weight")]
    return list(dict.fromkeys(picked))


def one(family):
    d = REF / family
    ids = json.loads((d / "expected.json").read_text())["input_ids"]
    docs = [ids[a:b] for a, b in zip(CUTS, CUTS[1:])]
    model = AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    model.zero_grad()
    total = 0
    for doc in docs:
        x = torch.tensor([doc])
        logits = model(input_ids=x).logits.float()[0]
        total = total + F.cross_entropy(logits[:-1], x[0, 1:], reduction="sum")
    total.backward()
    named = {n: p.grad.detach() for n, p in model.named_parameters()}
    grads = {}
    for n in small_tensors(list(named)):
        g = named[n]
        if n.endswith("wpe.weight"):
            g = g[:POSITION_ROWS]
        grads[n] = [float(f"{v:.9g}") for v in g.flatten().tolist()]
    out = {
        "family": family,
        "documents": docs,
        "targets": sum(len(x) - 1 for x in docs),
        "loss_sum": float(total.item()),
        "grad_norms": {n: float(g.norm().item()) for n, g in named.items()},
        "grads": grads,
        "position_rows": POSITION_ROWS,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{family}.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"{family}: loss_sum {out['loss_sum']:.6f}, tensors {list(grads)}")


def main():
    torch.manual_seed(0)
    for f in FAMILIES:
        one(f)


if __name__ == "__main__":
    main()
