"""Error-aware adapter init: the (A, B) that best cancels a module's quantization error on calibration inputs.

For a linear with weight W (out, in), quantized Q(W) dequantizing to D, and input second moments
H = E[x xᵀ], the output error of an adapter is E‖x (W − D − s·B·A)ᵀ‖² = tr(R H Rᵀ) with R = E − s·B·A,
E = W − D. With S = (H + λI)^½ the damped objective ‖R S‖² is minimised at rank r by the truncated SVD of
E·S = U Σ Vᵀ (QERA "exact" / CLoQ's LoRA step): B = U_r Σ_r^½ / s, A = Σ_r^½ V_rᵀ S⁻¹, s = alpha/rank (PEFT's
LoftQ forgets s, peft #1982). One SVD gives every rank's leftover: the damped minimum is Σ_{i>r} σ_i², and
the real (undamped) output error is Σ_{i>r} σ_i² m_i with m_i = v_iᵀ S⁻¹ H S⁻¹ v_i ≤ 1 — the error table.
All of it in float64; the result is cast to the adapter's dtype by ``qra_plugin.adapter_init``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from planner.fidelity.quantized import quantized_layer
from planner.loading import load_model, load_tokenizer
from planner.priors.calibration import calibration_batch
from planner.priors.moments import cached_second_moments, second_moments
from qra_plugin.adapter_init import file_sha256
from qra_plugin.backends import owner
from qra_plugin.errors import QRAError
from qra_plugin.io import write_bytes_atomic
from qra_plugin.modules import quantizable_linears
from qra_plugin.plan import ModulePlan, Plan
from qra_plugin.prune import prune_model


@dataclass(frozen=True)
class Whitening:
    """S = (H + λI)^½, its inverse and the diagonal of S⁻¹ H S⁻¹ in the eigenbasis (for the real error)."""

    basis: torch.Tensor  # Q, eigenvectors of H + λI (columns)
    root: torch.Tensor  # S
    inverse_root: torch.Tensor  # S⁻¹
    kept: torch.Tensor  # 1 − λ/d_j: the share of each eigen-direction that is real signal, not damping


def whitening(second_moments: torch.Tensor, damping: float = 0.01) -> Whitening:
    """Eigendecomposition of H + λI with λ = damping · mean(diag H) (float64); tiny eigenvalues are floored."""
    h = second_moments.double()
    lam = damping * float(h.diagonal().mean())
    values, basis = torch.linalg.eigh(h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
    values = values.clamp_min(max(lam, 1e-12 * float(values.max().clamp_min(1e-30))))
    root = (basis * values.sqrt()) @ basis.T
    inverse_root = (basis * values.rsqrt()) @ basis.T
    kept = (1.0 - lam / values).clamp(0.0, 1.0)
    return Whitening(basis=basis, root=root, inverse_root=inverse_root, kept=kept)


@dataclass(frozen=True)
class ErrorSVD:
    """svd(E·S) of one (module, quantization), and the real output error each singular direction carries."""

    u: torch.Tensor
    sigma: torch.Tensor
    vh: torch.Tensor
    weight: torch.Tensor  # m_i = v_iᵀ S⁻¹ H S⁻¹ v_i

    def leftover(self) -> torch.Tensor:
        """Output error E‖x Rᵀ‖² on the calibration inputs after the rank-r init, for r = 0 … len(sigma)."""
        parts = self.sigma.square() * self.weight
        tail = parts.flip(0).cumsum(0).flip(0)
        return torch.cat([tail, tail.new_zeros(1)])

    def damped_leftover(self) -> torch.Tensor:
        """The objective the init minimises, Σ_{i>r} σ_i² (= ‖E S‖² at r = 0), for r = 0 … len(sigma)."""
        tail = self.sigma.square().flip(0).cumsum(0).flip(0)
        return torch.cat([tail, tail.new_zeros(1)])


def error_svd(error: torch.Tensor, white: Whitening) -> ErrorSVD:
    """The one SVD a (module, bits, group, axis) needs for every rank."""
    u, sigma, vh = torch.linalg.svd(error.double() @ white.root, full_matrices=False)
    # m_i = v_iᵀ Q diag(1 − λ/d) Qᵀ v_i
    weight = ((vh @ white.basis).square() * white.kept).sum(dim=1)
    return ErrorSVD(u=u, sigma=sigma, vh=vh, weight=weight)


def adapter_pair(svd: ErrorSVD, white: Whitening, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (rank, in), B (out, rank)) with scale·B·A the best rank-``rank`` cancel of the error (float64)."""
    if rank < 1:
        raise QRAError("an error-aware init needs rank >= 1")
    r = min(rank, svd.sigma.numel())
    root_sigma = svd.sigma[:r].sqrt()
    a = root_sigma[:, None] * svd.vh[:r] @ white.inverse_root
    b = svd.u[:, :r] * root_sigma[None, :] / scale
    if r < rank:  # more rank than the error has directions: the extra rows/columns start at zero
        a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
    return a, b


def dequantized(layer: nn.Module) -> torch.Tensor:
    """The weight a quantized layer computes with, through its backend (float64, (out, in))."""
    backend = owner(layer)
    if backend is None:
        if isinstance(layer, nn.Linear):
            return layer.weight.detach().double()
        raise QRAError(f"{type(layer).__name__} is no quantized layer qra knows")
    if backend.dequantize is None:
        raise QRAError(f"backend {backend.name!r} cannot dequantize: no error-aware init for its layers")
    return backend.dequantize(layer).double()


def quantization_error(linear: nn.Linear, quantized: nn.Module) -> torch.Tensor:
    """E = W − deq(Q(W)) in float64."""
    return linear.weight.detach().double() - dequantized(quantized).to(linear.weight.device)


# ---------------------------------------------------------------- per module, per plan


def module_error_svd(
    linear: nn.Linear, mp: ModulePlan, moments: torch.Tensor, damping: float
) -> tuple[ErrorSVD, Whitening]:
    """svd(E·S) of ``linear`` quantized as ``mp`` says (through the layer cache, ``linear`` untouched)."""

    layer = quantized_layer(linear, mp, linear.weight.dtype, keep=False)
    white = _whitening_of(moments, damping)
    return error_svd(quantization_error(linear, layer), white), white


_WHITE: dict[tuple[int, float], tuple[torch.Tensor, Whitening]] = {}


def _whitening_of(moments: torch.Tensor, damping: float) -> Whitening:
    """Modules sharing an input share one H tensor: decompose it once (keyed by identity, the tensor held)."""
    key = (id(moments), damping)
    hit = _WHITE.get(key)
    if hit is None or hit[0] is not moments:
        if len(_WHITE) > 64:
            _WHITE.clear()
        hit = _WHITE[key] = (moments, whitening(moments, damping))
    return hit[1]


def error_init_tensors(
    model: nn.Module, plan: Plan, moments: dict[str, torch.Tensor], damping: float = 0.01
) -> dict[str, torch.Tensor]:
    """``<module>.lora_A`` / ``.lora_B`` (float32) for every quantized module with a rank whose backend can
    dequantize; ``model`` is the unquantized (already pruned, if the plan prunes) model."""
    tensors: dict[str, torch.Tensor] = {}
    for name, mp in plan.modules.items():
        if not mp.quantized_with_adapter:
            continue
        svd, white = module_error_svd(model.get_submodule(name), mp, moments[name], damping)
        a, b = adapter_pair(svd, white, mp.rank, mp.lora_alpha / mp.rank)
        tensors[f"{name}.lora_A"] = a.float().contiguous()
        tensors[f"{name}.lora_B"] = b.float().contiguous()
    return tensors


def attach_init_file(plan: Plan, tensors: dict[str, torch.Tensor], path: Path, plan_dir: Path | None) -> Plan:
    """Write the tensors to ``path`` (atomic) and return the plan naming it: ``init: error`` on those modules,
    ``init_file`` (relative to ``plan_dir`` when inside it) and the file's sha256 as ``init_hash``."""
    from safetensors.torch import save

    write_bytes_atomic(path, save(tensors))
    names = {key.rsplit(".", 1)[0] for key in tensors}
    modules = {n: m.model_copy(update={"init": "error"}) if n in names else m for n, m in plan.modules.items()}
    path = Path(path).resolve()
    shown = path.relative_to(plan_dir.resolve()) if plan_dir and path.is_relative_to(plan_dir.resolve()) else path
    updated = plan.model_copy(update={"modules": modules, "init_file": str(shown), "init_hash": file_sha256(path)})
    updated._source_dir = plan_dir.resolve() if plan_dir else None
    return updated


def plan_with_error_init(
    model: nn.Module,
    plan: Plan,
    tokens: torch.Tensor,
    init_path: str | Path,
    *,
    plan_dir: str | Path | None = None,
    damping: float = 0.01,
    batch: int = 8,
    moments: dict[str, torch.Tensor] | None = None,
) -> Plan:
    """The plan with error-aware adapters: pruned first (a pruned module is initialised on its pruned shape),
    second moments on ``tokens`` (or the given ``moments`` of this very model), A/B written to ``init_path``."""

    if plan.pruning:
        model = copy.deepcopy(model)
        prune_model(model, plan)
        moments = None  # the pruned inputs differ
    targets = [n for n, m in plan.modules.items() if m.quantized_with_adapter]
    if moments is None:
        moments = second_moments(model.eval(), tokens, targets, batch)
    tensors = error_init_tensors(model, plan, moments, damping)
    if not tensors:
        raise QRAError("the plan has no quantized module with a rank: nothing to initialise")
    return attach_init_file(plan, tensors, Path(init_path), Path(plan_dir) if plan_dir else None)


def save_plan(cfg, plan: Plan, paths: list[Path], out_dir: str | Path) -> None:
    """Save ``plan`` at each path; with ``adapter.init: error`` each gets its init file beside it
    (``<stem>.init.safetensors``, named relative to the plan), computed once from the profile's calibration
    rows and the second moments cached in ``out_dir`` next to the priors."""
    with_init: Plan | None = None
    for path in map(Path, paths):
        if cfg.adapter.init != "error":
            plan.save(path)
            continue
        init_path = path.with_name(f"{path.stem}.init.safetensors")
        if with_init is None:
            with_init = plan_for_config(cfg, plan, init_path, out_dir)
        else:
            write_bytes_atomic(init_path, with_init.init_path().read_bytes())
        with_init.model_copy(update={"init_file": init_path.name}).save(path)


def plan_for_config(cfg, plan: Plan, init_path: Path, out_dir: str | Path) -> Plan:
    """``plan_with_error_init`` with the model, calibration rows and damping a ``QRAConfig`` names."""

    p = cfg.profile
    model = load_model(cfg.model).eval()
    tokens = calibration_batch(
        load_tokenizer(cfg.model), cfg.data, p.calibration_examples, p.seq_len, p.calibration_offset, cfg.seed
    )
    names = [s.name for s in quantizable_linears(model)]
    moments = None if plan.pruning else cached_second_moments(model, tokens, names, out_dir, p.batch)
    return plan_with_error_init(
        model, plan, tokens, init_path, plan_dir=init_path.parent, damping=cfg.adapter.damping, moments=moments
    )


# ---------------------------------------------------------------- the error table


def error_table(
    model: nn.Module, space, moments: dict[str, torch.Tensor], damping: float = 0.01, backend: str | None = None
) -> dict[tuple[int, int, int], float]:
    """(unit index, bits, rank) -> the unit's summed starting output error on the calibration inputs with an
    error-aware rank-``rank`` init: one SVD per (module, bits) gives every rank. 16 bits: no error. Units are
    the space's (a block sums its modules); output errors of different modules are summed as they are."""
    table: dict[tuple[int, int, int], float] = {}
    for i, spec in enumerate(space.specs):
        unit = i if space.unit == "module" else spec.block
        linear = model.get_submodule(spec.name)
        for bits in space.bits:
            if bits >= 16:
                leftover = torch.zeros(max(space.ranks) + 1, dtype=torch.float64)
            else:
                mp = ModulePlan(bits=bits, backend=backend or space.backend)
                leftover = module_error_svd(linear, mp, moments[spec.name], damping)[0].leftover()
            for rank in space.ranks:
                key = (unit, bits, rank)
                table[key] = table.get(key, 0.0) + float(leftover[min(rank, leftover.numel() - 1)])
    return table
