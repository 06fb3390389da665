"""Compare prima-ref's logits and greedy tokens with the llama.cpp oracle JSON of a model.

    python scripts/compare_oracle.py smollm2-135m-q4_1 ~/.cache/prima-ref/models/SmolLM2-135M-Instruct.Q4_1.gguf

Prints, per oracle prompt: the largest |logit difference| over llama.cpp's top-5 ids at every
position of the batched pass, how many positions have a different top-5 set, and how long our
greedy continuation agrees with llama.cpp's.
"""

import prima_ref  # noqa: F401  (isort: split)

import json
import sys
from pathlib import Path

import numpy as np

from prima_ref.gguf_file import GGUFModel
from prima_ref.model.transformer import Transformer
from prima_ref.quants import set_num_threads

ORACLE = Path(__file__).resolve().parent.parent / "tests" / "data" / "oracle"


def main(name: str, path: str) -> None:
    set_num_threads(2)
    d = json.loads((ORACLE / f"{name}.json").read_text())
    m = GGUFModel.open(path)
    for g in d["generation"]:
        tr = Transformer(m, 256, kv_f16=False)
        ids = g["prompt_ids"] + g["greedy_ids"]
        logits = tr.forward(ids, 0, all_logits=True)
        worst, mism = 0.0, 0
        for i, top in enumerate(g["top5_batched"]):
            ref_ids = [a for a, _ in top]
            diff = np.abs(logits[i][ref_ids] - np.array([b for _, b in top])).max()
            worst = max(worst, float(diff))
            mism += set(np.argsort(-logits[i])[:5].tolist()) != set(ref_ids)
        tr = Transformer(m, 256, kv_f16=False)
        lg, pos, out = tr.forward(g["prompt_ids"], 0)[-1], len(g["prompt_ids"]), []
        for _ in g["greedy_ids"]:
            out.append(int(np.argmax(lg)))
            lg = tr.forward([out[-1]], pos)[-1]
            pos += 1
        same = next((i for i, (a, b) in enumerate(zip(out, g["greedy_ids"])) if a != b), len(out))
        print(f"{g['name']}: max|dlogit| top5 {worst:.4f}; top5 set mismatches {mism}/"
              f"{len(g['top5_batched'])}; greedy agrees for {same}/{len(out)} tokens")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
