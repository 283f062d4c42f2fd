"""Where a trained sparse GPT-2 keeps its attention weights: the query / key / value shares of each fused c_attn.

    python recipes/study/attention_split.py runs/study_lm/rigl-d0.1-s0 runs/study_lm/momentum-d0.1-s0

GPT-2 computes queries, keys and values with one fused projection (``attn.c_attn``, Conv1D [width, 3 x width]),
which the sparsity methods treat as one layer: a method may move its weights between the three. A saved model
holds the weights only (absent ones are exactly 0), so the nonzeros are the mask.
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Mapping

import torch

C_ATTN = re.compile(r"(?:^|\.)h\.(\d+)\.attn\.c_attn\.weight$")


def qkv_shares(state: Mapping[str, torch.Tensor]) -> dict[int, tuple[float, float, float]]:
    """{layer: (query, key, value) shares of c_attn's nonzero weights} of a GPT-2 state dict."""
    shares = {}
    for name, weight in state.items():
        found = C_ATTN.search(name)
        if found is None:
            continue
        if weight.dim() != 2 or weight.shape[1] % 3:
            raise ValueError(f"{name} has shape {tuple(weight.shape)}; expected GPT-2's Conv1D [width, 3 x width].")
        counts = [int(part.count_nonzero()) for part in weight.chunk(3, dim=1)]
        total = sum(counts)
        shares[int(found.group(1))] = tuple(c / total if total else 0.0 for c in counts)
    return dict(sorted(shares.items()))


def load_weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(path):
        raise ValueError(f"no model.safetensors in {folder}: give a saved model's folder (a finished study run).")
    return load_file(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="saved models' folders (e.g. a study's runs)")
    args = parser.parse_args(argv)
    for folder in args.folders:
        try:
            shares = qkv_shares(load_weights(folder))
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        if not shares:
            raise SystemExit(f"error: {folder} has no GPT-2 attention (h.<i>.attn.c_attn) weights.")
        line = "  ".join(f"layer {i}: q {q:.2f} k {k:.2f} v {v:.2f}" for i, (q, k, v) in shares.items())
        print(f"{os.path.basename(os.path.normpath(folder))}: {line}")


if __name__ == "__main__":
    main()
