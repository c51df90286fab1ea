"""The behaviour goldens of tests/goldens/ (written before the architecture redesign): every scenario
has its files, and the comparison does flag a changed tensor or value. The check itself
(`python tests/goldens/scenarios.py check`: the real command lines on tiny models, ~1.5 minutes on 2
cores) runs in CI as its own named step after the README's test command (.ci/run)."""
import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

GOLDENS = Path(__file__).resolve().parent / "goldens"


def load():
    spec = importlib.util.spec_from_file_location("golden_scenarios", GOLDENS / "scenarios.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_scenario_has_goldens():
    module = load()
    for name in module.SCENARIOS:
        assert (GOLDENS / f"{name}.safetensors").is_file() and (GOLDENS / f"{name}.json").is_file(), name


def test_the_comparison_flags_a_changed_tensor_and_a_changed_value():
    module = load()
    name = "linprobe_cached"
    tensors = load_file(GOLDENS / f"{name}.safetensors")
    values = json.loads((GOLDENS / f"{name}.json").read_text())
    assert module.compare(name, tensors, values) == []  # the goldens equal themselves
    assert (GOLDENS / "pretrain_umae_checkpoint-0.pth").is_file()  # the old checkpoint the resume starts from
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)
    changed = dict(tensors, **{key: tensors[key].clone().view(-1).index_add_(0, torch.tensor([0]),
                                                                         torch.tensor([1e-3])).view_as(tensors[key])})
    assert any(key in line for line in module.compare(name, changed, values))
    folder = next(k for k in values if k != "meta")
    line = values[folder][-1]
    metric = next(k for k, v in line.items() if isinstance(v, float))
    edited = json.loads(json.dumps(values))
    edited[folder][-1][metric] = line[metric] + 0.5
    assert any(metric in p for p in module.compare(name, tensors, edited))
