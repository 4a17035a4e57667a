"""Models split across devices (the bridge's ``device_map`` / ``n_devices``): the placement
map read from the modules, and the runner computing each block on its block's device.

A CPU has one device, but ``torch.device("cpu", i)`` are distinct device names that tensors
can be moved to; a placement naming ``cpu:1``, ``cpu:2``, ... per block therefore makes the
runner go through every move a multi-GPU split needs. The test records, for every primitive
the runner calls, which device its inputs were moved to, and checks that the results (masked
passes, EAP, EAP-IG) equal the single-device run exactly.
"""

from __future__ import annotations

import pytest
import torch

from circuitfind.errors import ConfigError
from circuitfind.patching import PatchingEngine
from circuitfind.patching.engine import GradientPoint
from circuitfind.patching.placement import (LAYER_METHODS, Placement, PlacedArchitecture, move,
                                            placed)
from circuitfind.testing import ToyTask, tiny_model

CPU = torch.device("cpu")


def test_placement_is_read_from_the_modules(tmp_path):
    model = tiny_model(tmp_path / "m", arch="llama", n_layers=3, n_heads=4, seed=0)
    arch = PatchingEngine(model).runner.arch
    placement = Placement.of(arch)
    assert placement == Placement(home=CPU, embed=CPU, layers=(CPU,) * 3, final=CPU)
    assert placement.single and placed(arch) is arch  # one device: the adapter itself
    # a block whose parameters span two devices, and a block offloaded to 'meta'
    arch.blocks[1].mlp.down_proj.to("meta")
    with pytest.raises(ConfigError, match="block 1 on one device, but its parameters are on "
                                          "cpu, meta"):
        Placement.of(arch)
    arch.blocks[1].to("meta")
    with pytest.raises(ConfigError, match="'meta' device"):
        Placement.of(arch)
    moved = move((torch.zeros(1), [torch.ones(1), 3], {"out": torch.ones(2)}, "x"), CPU)
    assert moved[1][1] == 3 and moved[2]["out"].shape == (2,) and moved[3] == "x"


def split(engine: PatchingEngine, log: list):
    """Put ``engine``'s runner on a placement with one (CPU) device name per block, logging
    every move and every primitive call; returns the placement."""
    arch = engine.runner.arch
    n = len(arch.blocks)
    placement = Placement(home=CPU, embed=torch.device("cpu", 1),
                          layers=tuple(torch.device("cpu", 2 + i) for i in range(n)),
                          final=torch.device("cpu", 2 + n))

    def mover(value, device):
        log.append(("move", device))
        return move(value, device, copy=True)  # a copy, as between real devices

    proxy = PlacedArchitecture(arch, placement, mover)
    for name in LAYER_METHODS:  # log each call as the adapter receives it
        inner = getattr(proxy, name)

        def logged(layer, *args, _inner=inner, _name=name, **kwargs):
            log.append(("layer", _name, layer))
            return _inner(layer, *args, **kwargs)

        setattr(proxy, name, logged)
    engine.runner.arch = proxy
    return placement


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "gemma2"])
def test_each_block_runs_on_its_device_and_results_equal_one_device(tiny_models, tmp_path,
                                                                     name):
    model = (tiny_model(tmp_path / "g", dtype=torch.float64, arch="gemma2", n_layers=3,
                        n_heads=4, seed=1) if name == "gemma2" else tiny_models(name))
    data = ToyTask(seq_len=6, positions=2).build(model.tokenizer, 4, seed=3)
    one, many = PatchingEngine(model), PatchingEngine(model)
    log: list = []
    placement = split(many, log)
    g = one.graph
    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, g.n_senders, g.n_receivers, generator=gen) > 0.5).double()
    sparse = torch.ones(2, g.n_senders, g.n_receivers, dtype=torch.float64)
    sparse[0, :, g.n_receivers - 1] = 0  # only the logits touched: starts at the last layer
    sparse[1, 0, g.q_start[1]] = 0  # one edge into layer 1
    points = [GradientPoint(0.5), GradientPoint(0.5, "a0")]
    for run in (lambda e: e.runner.logits(data.clean), lambda e: e.evaluate(data, masks),
                lambda e: e.evaluate(data, sparse), lambda e: e.edge_attribution(data),
                lambda e: e.edge_attribution(data, points=points)):
        log.clear()
        assert torch.equal(run(many), run(one))
        calls = [i for i, entry in enumerate(log) if entry[0] == "layer"]
        assert calls, "the runner called no block primitive"
        for i in calls:  # each block primitive ran on its block's device ...
            _, method, layer = log[i]
            assert log[i + 1] == ("move", placement.layers[layer]), (method, layer)
            # ... and its results came home (or filled a home buffer in place: ``out=``)
            after = log[i + 2] if i + 2 < len(log) else ("end",)
            assert after == ("move", CPU) or after[0] in ("layer", "end"), (method, after)
    # the embeddings and the final norm ran on theirs
    log.clear()
    many.runner.logits(data.clean)
    assert ("move", placement.embed) in log and ("move", placement.final) in log
    assert {entry[2] for entry in log if entry[0] == "layer"} == set(range(g.n_layers))
