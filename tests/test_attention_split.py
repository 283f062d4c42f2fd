"""The q/k/v shares of a saved sparse GPT-2's fused attention projection."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from study.attention_split import main, qkv_shares


def test_shares_count_nonzeros_in_the_query_key_and_value_columns(tmp_path, capsys):
    weight = torch.zeros(4, 12)  # Conv1D [width 4, 3 x 4]: columns 0-3 query, 4-7 key, 8-11 value
    weight[:, 0], weight[0, 5], weight[:, 8:10] = 1.0, 2.0, 3.0  # 4 query, 1 key, 8 value nonzeros
    state = {"transformer.h.1.attn.c_attn.weight": weight, "transformer.h.0.attn.c_attn.weight": torch.ones(4, 12),
             "transformer.h.0.mlp.c_fc.weight": torch.zeros(4, 16)}
    shares = qkv_shares(state)
    assert list(shares) == [0, 1]
    assert shares[0] == pytest.approx((1 / 3, 1 / 3, 1 / 3)) and shares[1] == pytest.approx((4 / 13, 1 / 13, 8 / 13))
    save_file(state, str(tmp_path / "model.safetensors"))
    main([str(tmp_path)])
    assert "layer 1: q 0.31 k 0.08 v 0.62" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no model.safetensors"):
        main([str(tmp_path / "missing")])
    with pytest.raises(ValueError, match=r"expected GPT-2's Conv1D"):
        qkv_shares({"h.0.attn.c_attn.weight": torch.ones(4, 10)})
