"""The registry of adapter kinds: every kind module is found by itself and declares everything the rest of the
engine asks about it, and each trainable form saves tensors its own kind loads back to the same extra output."""
from __future__ import annotations

import pkgutil

import pytest
import torch

from lib_lora import adapters, keymap
from lib_lora.adapters import ADAPTER_CLASSES, TRAINABLE_KINDS, kind_label, make_adapter
from lib_lora.train.config import ALGOS
from lib_lora.train.form import ALGO_BY_LABEL


def test_every_kind_module_is_registered_with_its_names_and_labels():
    modules = {m.name for m in pkgutil.iter_modules(adapters.__path__)} - {"base"}
    assert {cls.__module__.rsplit(".", 1)[1] for cls in ADAPTER_CLASSES} == modules
    assert [cls.kind for cls in ADAPTER_CLASSES][:3] == ["lora", "loha", "lokr"] and ADAPTER_CLASSES[-1].kind == "ia3"
    assert all(name in keymap.PARAMS for cls in ADAPTER_CLASSES for name in cls.tensor_names())
    assert ALGOS == ("lora", "loha", "lokr") == tuple(TRAINABLE_KINDS)
    assert ALGO_BY_LABEL == {"LoRA": "lora", "LoCon": "lora", "LoHa": "loha", "LoKr": "lokr"}
    assert (kind_label("locon"), kind_label("lora", dora=True), kind_label("boft"), kind_label("loha", dora=True)) == (
        "LoCon", "DoRA", "BOFT", "LoHa+DoRA")


LAYERS = {"linear": lambda: torch.nn.Linear(12, 8), "conv3x3": lambda: torch.nn.Conv2d(6, 8, 3, padding=1, stride=2),
          "conv1x1": lambda: torch.nn.Conv2d(6, 8, 1)}


@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize("dim", [1, 4])  # LoKr: w2 factorised at rank 1, full at rank 4
@pytest.mark.parametrize("algo", list(TRAINABLE_KINDS))
def test_trainable_form_loads_back_as_its_kind_with_the_same_output(algo, dim, layer_name):
    torch.manual_seed(0)
    layer = LAYERS[layer_name]()
    kind = TRAINABLE_KINDS[algo]
    trainable = kind.trainable(layer, dim, 1.5, None)
    with torch.no_grad():
        for p in trainable.parameters():
            p.normal_()
    tensors = dict(trainable.state_dict())
    adapter = make_adapter("lora_unet_x", tensors)
    assert type(adapter) is kind and set(tensors) <= kind.tensor_names()
    x = torch.randn(3, 12) if layer_name == "linear" else torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        expected = trainable(x)
        torch.testing.assert_close(adapter.bypass(x, layer, layer.weight, 1.0, None), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(trainable.add_to(layer(x), x), layer(x) + expected, atol=1e-5, rtol=1e-5)
