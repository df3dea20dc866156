"""Full-size Stage B / Stage C built on ``meta`` reproduce the official checkpoints' state_dict exactly.

Same keys, same order, same shapes as ``tests/data/checkpoint_keys/*.keys.txt`` (produced from the official
classes), and the exact parameter counts published for each model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from torch import nn

from models.config import StageBConfig, StageCConfig
from models.stage_b import StageB
from models.stage_c import StageC
from tests.models.checkpoint_keys import read_key_list

CASES: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "stage_c": (lambda: StageC(StageCConfig.big()), 3_589_103_632),
    "stage_c_lite": (lambda: StageC(StageCConfig.lite()), 1_030_785_040),
    "stage_b": (lambda: StageB(StageBConfig.big()), 1_562_941_136),
    "stage_b_lite": (lambda: StageB(StageBConfig.lite()), 699_471_248),
}


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_matches_official_key_list(name: str) -> None:
    build, n_params = CASES[name]
    with torch.device("meta"):
        model = build()
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    expected = read_key_list(name)
    assert len(ours) == len(expected)
    for i, (got, want) in enumerate(zip(ours, expected)):
        assert got == want, f"{name}: entry {i} is {got}, official is {want}"
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert not list(model.buffers()), "B/C networks have no buffers"


def test_config_is_stored() -> None:
    cfg = StageBConfig.tiny()
    assert StageB(cfg).config is cfg
    cfg_c = StageCConfig.tiny()
    assert StageC(cfg_c).config is cfg_c


def test_inconsistent_config_is_refused() -> None:
    with pytest.raises(ValueError, match="nhead"):
        StageC(replace(StageCConfig.tiny(), nhead=(1,)))
    with pytest.raises(ValueError, match="level_config"):
        StageB(replace(StageBConfig.tiny(), level_config=("CT", "CT", "CTA", "CTX")))
