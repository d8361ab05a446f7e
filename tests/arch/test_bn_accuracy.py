"""Issue 12's accuracy bar on the BatchNorm models: after BatchNorm folding, GPFQ at 4 bits
is within 1.5 points of float and not below RTN; at 8 bits within 0.5 points."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.arch import zoo
from tests.arch.harness import source


def accuracies(model_path, name: str) -> dict[str, float]:
    """Eval accuracy of the float model and of RTN / GPFQ at 4 and 8 bits (quantize stage)."""
    from compress.data import DataBundle, Split, builtin
    from compress.metrics import evaluate
    from compress.quantize.config import GPFQConfig, RTNConfig
    from compress.quantize.stage import apply
    from compress.state import ModelState, StageContext

    model = zoo.FACTORIES[name]()
    model.load_state_dict(torch.load(model_path, weights_only=True))
    model.eval()
    src = source(name)
    x, y = (torch.as_tensor(a) for a in builtin(src, "train"))
    xe, ye = (torch.as_tensor(a) for a in builtin(src, "test"))
    bundle = DataBundle(
        {"train": Split("train", x, y, 128, 0), "calibration": Split("calibration", x[:512], None, 256, 0)}
    )
    out = {"float": evaluate(model, xe, ye)["accuracy"]}
    for bits in (4, 8):
        for cfg in (RTNConfig(bits=bits), GPFQConfig(bits=bits)):
            state = ModelState(copy.deepcopy(model), (1, *x.shape[1:]))
            ctx = StageContext(bundle, out_dir=None, device=torch.device("cpu"), reference=model, seed=0)
            apply(state, cfg, ctx)
            assert ctx.metrics["quantize"]["batchnorm_folded"], "the BatchNorm layers were not folded"
            out[f"{cfg.method}{bits}"] = evaluate(state.module, xe, ye)["accuracy"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["conv_bn1d", "resnet_bn", "depthwise"])
def test_gpfq_on_batchnorm_models(zoo_models, name):
    torch.set_num_threads(1)
    acc = accuracies(zoo_models(name), name)
    print(name, {k: round(100 * v, 2) for k, v in acc.items()})
    assert acc["gpfq4"] >= acc["float"] - 0.015, acc
    assert acc["gpfq4"] >= acc["rtn4"], acc
    assert acc["gpfq8"] >= acc["float"] - 0.005, acc
