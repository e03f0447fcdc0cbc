"""One registry feeds every reader: a backend registered once is validated, priced, quantized, metered and
checked for sharding everywhere, with no other file touched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qra_plugin.backends import Backend, owner, registry


class AbsmaxInt8Linear(nn.Module):
    """A real (if plain) 8-bit layer: per-row absmax int8 weights, the scales kept outside the buffers."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.data.float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.scales = {"row": scale.to(dtype)}  # hidden from parameters()/buffers(), like HQQ's meta
        self.bias = None
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.qweight.to(self.dtype) * self.scales["row"]).T


def _toy_backend() -> Backend:
    return Backend(
        name="toy8",
        bits=frozenset({8}),
        quantize=lambda linear, plan, dtype: AbsmaxInt8Linear(linear, dtype),
        stored_bytes=lambda spec, plan, dtype: spec.numel + spec.out_features * dtype.itemsize,
        owns=lambda module: isinstance(module, AbsmaxInt8Linear),
        hidden_tensors=lambda module: [module.scales["row"]],
        shardable=lambda bits, half: True,
        axolotl_kernels=False,
    )


@pytest.fixture
def toy8():
    backends = registry()
    backends["toy8"] = _toy_backend()
    yield backends["toy8"]
    del backends["toy8"]


def test_the_shipped_backends_declare_everything() -> None:
    backends = registry()
    assert set(backends) >= {"hqq", "bnb", "none"}
    assert backends["hqq"].bits == {2, 3, 4, 8} and backends["bnb"].bits == {4, 8} and backends["none"].bits == {16}
    assert backends["hqq"].default_group == {2: 16, 3: 32, 4: 64, 8: 64}
    assert backends["bnb"].shardable(4, True) and backends["bnb"].shardable(4, False)  # nf4: bf16 and fp32
    assert not backends["bnb"].shardable(8, True) and all(backends["hqq"].shardable(b, False) for b in (2, 3, 4, 8))
    assert not backends["hqq"].flat_shardable(4, True) and backends["bnb"].flat_shardable(4, True)
    assert not backends["bnb"].flat_shardable(4, False)  # FSDP1 flattens nf4 only in a half dtype
    assert not backends["hqq"].axolotl_kernels and backends["bnb"].axolotl_kernels


def test_a_registered_backend_reaches_every_reader(toy8) -> None:
    from planner.config import SpaceSection
    from planner.memory import Budget, base_module_bytes
    from planner.tiny import build_tiny_model
    from qra_plugin.axolotl.args import kernels_blocked_by
    from qra_plugin.distributed import check_sharding
    from qra_plugin.modules import is_quantized_linear, quantizable_linears
    from qra_plugin.plan import ModulePlan, Plan
    from qra_plugin.quantize import quantize_model
    from qra_plugin.weight_memory import memory_report

    assert ModulePlan(bits=8, backend="toy8").backend == "toy8"  # plan schema
    with pytest.raises(ValueError, match="cannot store 4-bit"):
        ModulePlan(bits=4, backend="toy8")
    assert SpaceSection(backend="toy8", bits=[8, 16]).backend == "toy8"  # config
    assert Budget.parse("uniform:8bit-toy8:r16").uniform == (8, 16, "toy8")  # budget language

    model = build_tiny_model("llama", layers=2, hidden=32, vocab_size=128)
    spec = quantizable_linears(model)[0]
    assert (
        base_module_bytes(spec, ModulePlan(bits=8, backend="toy8"), torch.float32) == spec.numel + 4 * spec.out_features
    )

    plan = Plan.uniform(model, bits=8, rank=4, backend="toy8")
    check_sharding(plan, sharding="fsdp", half_precision=False)  # its own shardable() says yes
    assert kernels_blocked_by(plan) == ["toy8"]
    ids = torch.randint(0, 128, (1, 8))
    before = model(input_ids=ids).logits
    quantize_model(model, plan)
    layer = model.get_submodule(spec.name)
    assert isinstance(layer, AbsmaxInt8Linear) and is_quantized_linear(layer) and owner(layer) is toy8
    assert torch.allclose(model(input_ids=ids).logits, before, atol=0.05)  # a real, accurate quantization
    measured = next(m for m in memory_report(model).modules if m.name == spec.name)
    assert measured.bytes == spec.numel + 4 * spec.out_features  # the meter saw the hidden scales
