"""The checkout's top-level kernels/ folder never shadows an installed package called `kernels`.

transformers (5.2x) requires Hugging Face's `kernels` package and imports it as soon as a model module loads. Python
puts the working directory first on sys.path for `python -c`, `python -m pytest` and a REPL, so when kernels/ was a
regular package, every such process started in the checkout's root failed at `from transformers import
GPT2LMHeadModel`. This runs exactly that: a fresh interpreter in the repository root, with a `kernels` package
installed (Hugging Face's where pip installed it, otherwise a stand-in on PYTHONPATH, which ranks below the working
directory just as site-packages does), importing a transformers model class and sparse_nlp.kernels and training one
block-sparse step.
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys
from pathlib import Path

import kernels
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import sparse_nlp
import sparse_nlp.kernels
from sparse_nlp.layers.block import BlockSparseLinear

repo = Path(sys.argv[1]).resolve()
assert sys.path[0] in ("", str(repo)), f"the checkout's root is not first on sys.path: {sys.path[:3]}"
origin = getattr(kernels, "__file__", None)  # None: a namespace package, i.e. the checkout's folder
assert origin and Path(origin).resolve().parent != repo / "kernels", (
    f"`import kernels` found the checkout's folder, not the installed package: {list(kernels.__path__)}")
assert Path(sparse_nlp.kernels.ops.__file__).name == "ops.py"

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
sparse_nlp.sparsify(model, density=0.5, block_size=16)
assert any(isinstance(module, BlockSparseLinear) for module in model.modules())
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
controller = sparse_nlp.SparsityController(model, optimizer, total_steps=2)
ids = torch.randint(0, 64, (2, 16))
before = [p.detach().clone() for p in model.parameters()]
loss = model(input_ids=ids, labels=ids).loss
loss.backward()
optimizer.step()
controller.step()
assert torch.isfinite(loss)
assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "the step changed no weight"
print("trained one block-sparse step; kernels from", origin)
"""


def _has_hub_kernels() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_checkout_root_imports_installed_kernels_and_trains_block_sparse(tmp_path):
    env = dict(os.environ, PYTHONPATH="")
    env.pop("PYTHONSAFEPATH", None)  # keep Python's default: the working directory first on sys.path
    if not _has_hub_kernels():  # an older transformers that does not require it: install a stand-in
        stand_in = tmp_path / "site" / "kernels"
        stand_in.mkdir(parents=True)
        (stand_in / "__init__.py").write_text("STAND_IN = True\n")
        env["PYTHONPATH"] = str(tmp_path / "site")
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained one block-sparse step" in result.stdout
