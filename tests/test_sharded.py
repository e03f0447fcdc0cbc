"""Sharded training for real on 2 CPU processes over gloo: DDP and DeepSpeed ZeRO-1/2/3 through ``accelerate
launch``, FSDP2 (torch ``fully_shard`` under torchrun), each with a mixed HQQ 2/3/4/8 + 16-bit plan (ranks
incl. 0, a pruned block) applied by ``qra_plugin.apply_plan``, against one process running the same global
batch (tests/sharded_worker.py); bitsandbytes nf4 under FSDP2 and ZeRO-3 in bf16 and fp32; ``axolotl train``
under ZeRO-3 and (2 GPUs; on CPU up to the libraries' own checks) FSDP2.

Loss tolerance 1e-5 absolute: a sharded step does the same arithmetic as one process except the order of the
sums that average gradients across ranks (and DeepSpeed's flattened Adam), fp32 rounding of ~1e-7 per step;
measured gaps are at most 5e-7 over 3 steps. A real bug (a rank training alone, a layer dropped, a shard read
as a whole) moves the loss by 1e-3 or more.

The first DeepSpeed run on a machine JIT-builds DeepSpeed's shared-memory comm op (about 2 minutes on 2
cores, cached in ~/.cache/torch_extensions); later runs take about 45 s.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qra_plugin import ModulePlan, Plan, load_for_inference
from qra_plugin.plan import BlockPruning
from tests.launch import SESSION_ENV, leaked_keys

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "sharded_worker.py"
BIN = Path(sys.executable).parent
#: every HQQ bit-width, rank 0 (no adapter) and a 16-bit module, cycled over the modules
CHOICES = [ModulePlan(bits=b, rank=r) for b, r in ((2, 4), (3, 0), (4, 12), (8, 4), (16, 8))]
LOSS_TOL = 1e-5
GPUS = torch.cuda.device_count() >= 2  # the worker puts each rank on its own GPU when there are enough
#: accelerate/state.py (1.13) turns FSDP on only inside ``elif self.distributed_type in [DistributedType.MULTI_GPU,
#: ..., DistributedType.MULTI_NEURON]:``; on CPU the type is MULTI_CPU (ACCELERATE_USE_CPU) or NO, so
#: ``accelerate launch --use_fsdp`` runs unsharded there (measured: DistributedType.NO, each rank training alone)
ACCELERATE_FSDP_ON_CPU = (
    "accelerate enables FSDP only for GPU-like distributed types (accelerate/state.py: `elif self.distributed_type "
    "in [DistributedType.MULTI_GPU, ...]`); on CPU it is DistributedType.NO/MULTI_CPU and runs unsharded — "
    "test_fsdp2_shards_hqq_and_matches_one_process runs the same fully_shard calls via torchrun instead"
)


def sharded_plan(model) -> Plan:
    base = Plan.uniform(model, bits=4, rank=8)
    modules = {name: CHOICES[i % len(CHOICES)] for i, name in enumerate(base.modules)}
    pruning = {1: BlockPruning(mlp_keep=list(range(0, 128, 2)), kv_keep=[1])}  # half of block 1's MLP, one kv head
    return Plan(fingerprint=base.fingerprint, modules=modules, pruning=pruning)


def _env() -> dict[str, str]:
    """The launchers' environment: the session's as it started (``tests.launch``: nothing an earlier in-process
    test exported, such as Axolotl's ``ACCELERATE_USE_FSDP`` / ``FSDP_*`` / ``RANK``), without launcher settings."""
    inherited = {k: v for k, v in SESSION_ENV.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env = {**inherited, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if not GPUS:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator: gloo collectives
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("ACCELERATE_USE_CPU", None)  # with it accelerate drops DeepSpeed: `elif ...USE_DEEPSPEED... and not cpu`
    return env


def _run(cmd: list[str], cwd: Path, **env: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**_env(), **env}, timeout=600, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A saved tiny Llama, the plan, and the single-process run everything is compared with."""
    from planner.tiny import build_tiny_model, save_tiny_model

    root = tmp_path_factory.mktemp("sharded")
    model_dir = save_tiny_model(root / "model", seed=0)
    plan = sharded_plan(build_tiny_model("llama", seed=0))
    plan.save(root / "plan.yaml")
    args = ["--model", str(model_dir), "--plan", str(root / "plan.yaml")]
    _run([sys.executable, str(WORKER), "--mode", "single", *args, "--out", str(root / "single")], root)
    return root, args


def _launch(job, mode: str, port: int, bf16: bool = False) -> tuple[Path, list[dict], dict]:
    """Run the worker in ``mode`` on 2 ranks; with ``bf16`` the model trains in bfloat16 (DeepSpeed's ``bf16``)."""
    root, args = job
    out = root / mode
    precision = "bf16" if bf16 else "no"
    accelerate = shutil.which("accelerate", path=str(BIN)) or str(BIN / "accelerate")
    env = {}
    if mode == "ddp":
        launcher = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
        env = {} if GPUS else {"ACCELERATE_USE_CPU": "true"}  # without it each CPU rank trains alone
    elif mode == "accelerate-fsdp2":
        launcher = [accelerate, "launch", "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy",
                    "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
                    "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(port),
                    "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    elif mode == "fsdp2":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
    else:
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": int(mode[-1])},
            "zero_force_ds_cpu_optimizer": False,  # a torch AdamW: DeepSpeed's CPU Adam is an unbuilt op
            "steps_per_print": 10**9,
            **({"bf16": {"enabled": True}} if bf16 else {}),
        }
        (root / f"{mode}.json").write_text(json.dumps(config))
        launcher = [accelerate, "launch", "--use_deepspeed", "--deepspeed_config_file", str(root / f"{mode}.json"),
                    "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(port),
                    "--mixed_precision", precision, "--dynamo_backend", "no"]  # fmt: skip
    _run([*launcher, str(WORKER), "--mode", mode, *args, "--out", str(out)], root, **env)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((root / "single" / "rank0.json").read_text())
    return out, ranks, single


@pytest.fixture(scope="module")
def nf4_job(tmp_path_factory):
    """bitsandbytes nf4 (with and without an adapter), HQQ 4-bit and 16-bit modules; per dtype (called with it) a
    directory with the model, the plan and one process's run. In bf16 the packed nf4 bytes are stored as bf16
    (``quant_storage``, the layout FSDP1 needs), in fp32 as uint8."""
    from planner.tiny import build_tiny_model, save_tiny_model

    top = tmp_path_factory.mktemp("sharded_nf4")
    base = Plan.uniform(build_tiny_model("llama", seed=0), bits=4, rank=8)
    choices = [ModulePlan(bits=4, backend="bnb", rank=8), ModulePlan(bits=4, rank=4), ModulePlan(bits=16, rank=8),
               ModulePlan(bits=4, backend="bnb", rank=0)]  # fmt: skip
    modules = {name: choices[i % len(choices)] for i, name in enumerate(base.modules)}

    def make(dtype: str) -> tuple[Path, list[str]]:
        root = top / dtype
        args = ["--model", str(root / "model"), "--plan", str(root / "plan.yaml"), "--dtype", dtype]
        if not (root / "single").is_dir():
            save_tiny_model(root / "model", seed=0)
            Plan(fingerprint=base.fingerprint, modules=modules).save(root / "plan.yaml")
            _run([sys.executable, str(WORKER), "--mode", "single", *args, "--out", str(root / "single")], root)
        return root, args

    return make


#: bf16 runs: the first step's loss is the same forward as one process's (exact); later steps differ by bf16
#: rounding of gradients averaged in another order and, under DeepSpeed, by its fp32 master copy of the LoRA
#: weights (one process steps them in bf16): measured gaps <= 2.3e-4 over 3 steps (fp32: <= 1e-6, LOSS_TOL)
BF16_LOSS_TOL = 1e-3


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(("mode", "port"), [("fsdp2", 29641), ("zero3", 29642)])
def test_nf4_shards_and_matches_one_process(nf4_job, mode, port, dtype):
    """bitsandbytes nf4 under FSDP2 and ZeRO-3 on 2 CPU ranks (bitsandbytes 0.50 has CPU nf4 kernels): each
    packed weight is sharded in half, the gathered layer finds its quant state on the module
    (``Params4bit(module=...)``, qra_plugin/backends/bnb.py), and the loss follows one process's."""
    job = nf4_job(dtype)
    root, _ = job
    out, ranks, single = _launch(job, mode, port + (dtype == "float32") * 10, bf16=dtype == "bfloat16")
    packed = "torch.bfloat16" if dtype == "bfloat16" else "torch.uint8"
    for r in ranks:
        assert r["losses"][0] == single["losses"][0]  # the gathered nf4 layers compute what one process does
        tol = BF16_LOSS_TOL if dtype == "bfloat16" else LOSS_TOL
        assert r["losses"] == pytest.approx(single["losses"], abs=tol)
        assert len(r["nf4_shards"]) == sum(m.backend == "bnb" for m in Plan.load(root / "plan.yaml").modules.values())
        for name, shard in r["nf4_shards"].items():
            assert shard["dtype"] == packed and not shard["requires_grad"], name
            assert shard["held"] == math.ceil(shard["full"] / 2), (name, shard)
    from safetensors.torch import load_file

    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    for name, module in Plan.load(root / "plan.yaml").modules.items():
        a = tensors.get(f"base_model.model.{name}.lora_A.weight")
        assert (a is None) == (module.rank == 0) and (a is None or a.shape[0] == module.rank), name


def _check_run(job, out: Path, ranks: list[dict], single: dict) -> None:
    root, _ = job
    assert [r["world_size"] for r in ranks] == [2, 2] and len(single["losses"]) == 3
    for r in ranks:  # every step's global-batch loss equals one process's
        assert r["losses"] == pytest.approx(single["losses"], abs=LOSS_TOL)
        assert r["hqq_digest"] == single["hqq_digest"]  # each rank quantized to the very same layers
    assert len(ranks[0]["hqq_shards"]) == sum(c.bits < 16 for c in Plan.load(root / "plan.yaml").modules.values())
    from safetensors.torch import load_file

    plan = Plan.load(root / "plan.yaml")
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    for name, module in plan.modules.items():
        a, b = (tensors.get(f"base_model.model.{name}.lora_{x}.weight") for x in "AB")
        assert (a is None) == (b is None) == (module.rank == 0), name  # every trained tensor gathered whole
        assert a is None or (a.shape[0] == b.shape[1] == module.rank and b.abs().sum() > 0), name
    run_device = ranks[0]["device"]  # reload where rank 0 ran, so the same kernels give the same logits
    reloaded = load_for_inference(root / "model", plan, out / "adapter", device=run_device)
    from tests.sharded_worker import probe_ids

    with torch.no_grad():
        logits = reloaded(input_ids=probe_ids(reloaded.config.vocab_size).to(run_device)).logits.cpu()
    assert torch.equal(logits, torch.load(out / "probe_logits.pt"))  # the sharded model's own logits
    assert torch.allclose(logits, torch.load(root / "single" / "probe_logits.pt"), atol=1e-4)


def _assert_priced(job, ranks: list[dict], sharding: str) -> None:
    """What each rank stores after training is what ``qra estimate --world-size 2 --sharding`` predicts (1%:
    optimizer step counters and DeepSpeed's alignment padding are not priced; measured gaps are <= 88 B)."""
    from planner.memory import estimate
    from planner.model_info import load_model_info
    from planner.settings import TrainingSettings
    from planner.sharding import per_rank

    root, _ = job
    info, plan = load_model_info(str(root / "model")), Plan.load(root / "plan.yaml")
    rank = per_rank(
        info, plan, estimate(info, plan, TrainingSettings(batch=2, seq_len=32)), world_size=2, sharding=sharding
    )
    for r in ranks:
        for part, held in r["held"].items():
            assert held == pytest.approx(rank[part], rel=0.01, abs=256), (sharding, part)


def _assert_sharded(ranks: list[dict], sharded: bool) -> None:
    for r in ranks:
        for name, shard in r["hqq_shards"].items():
            assert shard["dtype"] in ("torch.uint8", "torch.int32") and not shard["requires_grad"], name
            # packed rows are even at every bit-width (4, 4, 32, 64), so each of 2 ranks holds exactly half
            assert shard["held"] == (math.ceil(shard["full"] / 2) if sharded else shard["full"]), (name, shard)


def test_ddp_replicates_hqq_and_matches_one_process(job):
    out, ranks, single = _launch(job, "ddp", 29630)
    assert ranks[0]["distributed_type"] == ("DistributedType.MULTI_GPU" if GPUS else "DistributedType.MULTI_CPU")
    _assert_sharded(ranks, sharded=False)
    _assert_priced(job, ranks, "ddp")
    _check_run(job, out, ranks, single)


def test_fsdp2_shards_hqq_and_matches_one_process(job):
    out, ranks, single = _launch(job, "fsdp2", 29631)
    assert ranks[0]["engine"].startswith("FSDP")  # fully_shard swapped in its FSDP class
    _assert_sharded(ranks, sharded=True)
    _assert_priced(job, ranks, "fsdp2")
    _check_run(job, out, ranks, single)


def test_deepspeed_zero3_shards_hqq_and_matches_one_process(job):
    out, ranks, single = _launch(job, "zero3", 29632)
    assert [r["engine"] for r in ranks] == ["DeepSpeedEngine"] * 2 and ranks[0]["zero_stage"] == 3
    _assert_sharded(ranks, sharded=True)
    _assert_priced(job, ranks, "zero3")
    _check_run(job, out, ranks, single)


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero1_zero2_replicate_hqq_and_match_one_process(job, stage):
    out, ranks, single = _launch(job, f"zero{stage}", 29635 + stage)
    assert [r["engine"] for r in ranks] == ["DeepSpeedEngine"] * 2 and ranks[0]["zero_stage"] == stage
    _assert_sharded(ranks, sharded=False)
    _assert_priced(job, ranks, f"zero{stage}")
    _check_run(job, out, ranks, single)


@pytest.mark.skipif(not GPUS, reason=ACCELERATE_FSDP_ON_CPU)
def test_accelerate_fsdp2_shards_hqq_and_matches_one_process(job):
    """``accelerate launch --use_fsdp --fsdp_version 2`` (accelerate's fsdp2_prepare_model: fully_shard per
    decoder layer + root) with the same plan; needs 2 GPUs, see ACCELERATE_FSDP_ON_CPU."""
    out, ranks, single = _launch(job, "accelerate-fsdp2", 29634)
    assert ranks[0]["distributed_type"] == "DistributedType.FSDP"
    _assert_sharded(ranks, sharded=True)
    _check_run(job, out, ranks, single)


def _axolotl(job, name: str, launcher: list[str], **keys) -> subprocess.CompletedProcess:
    """``axolotl.cli.train`` on the tiny model with the mixed plan and extra YAML ``keys``, under ``launcher``."""
    from tests.test_axolotl import _config

    root, _ = job
    work = root / name
    work.mkdir()
    config = _config(work, root / "model", qra_plan=str(root / "plan.yaml"), **keys)
    accelerate = shutil.which("accelerate", path=str(BIN)) or str(BIN / "accelerate")
    cmd = [accelerate, "launch", *launcher, "--num_machines", "1", "-m", "axolotl.cli.train", str(config)]
    env = {**_env(), "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=work)


def _check_axolotl_run(job, proc: subprocess.CompletedProcess, out: Path) -> None:
    """Both ranks end on the same loss; the adapter holds every planned rank, gathered whole; it reloads."""
    root, _ = job
    assert proc.returncode == 0, proc.stderr[-4000:]
    finals = re.findall(r"'train_loss': '([0-9.]+)'", proc.stdout + proc.stderr)
    assert len(finals) == 2 and finals[0] == finals[1]  # both ranks trained the same synchronised model
    plan = Plan.load(root / "plan.yaml")
    from safetensors.torch import load_file

    tensors = load_file(out / "adapter_model.safetensors")
    for name, module in plan.modules.items():
        a, b = (tensors.get(f"base_model.model.{name}.lora_{x}.weight") for x in "AB")
        assert (a is None) == (module.rank == 0), name  # gathered whole at save, not one rank's shards
        assert a is None or (a.shape[0] == b.shape[1] == module.rank and b.abs().sum() > 0), name
    reloaded = load_for_inference(root / "model", plan, out)
    assert torch.isfinite(reloaded(input_ids=torch.tensor([[5, 9, 17, 33]])).logits).all()


def test_axolotl_train_under_deepspeed_zero3_with_an_hqq_plan(job):
    """``axolotl train`` with a ``deepspeed:`` stage-3 config: transformers builds the model under ``zero.Init``
    (every parameter a partition), so the plugin gathers the weights to prune and quantize them
    (``qra_plugin.distributed.gathered``; without it the pruning probe stops at "Padding_idx must be within
    num_embeddings"). Axolotl's data pipeline is its own, so ranks are compared with each other, not with
    tests/sharded_worker.py's single run."""
    root, _ = job
    ds = root / "axolotl_zero3.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                              "zero_optimization": {"stage": 3}, "zero_force_ds_cpu_optimizer": False}))  # fmt: skip
    launcher = ["--use_deepspeed", "--deepspeed_config_file", str(ds), "--num_processes", "2",
                "--main_process_port", "29639"]  # fmt: skip
    proc = _axolotl(job, "axolotl", launcher, deepspeed=str(ds))
    _check_axolotl_run(job, proc, root / "axolotl" / "out")


#: ``fsdp_version: 2`` with Axolotl's FSDP2 keys: one decoder layer per unit, full state dict at save
AXOLOTL_FSDP2 = {
    "fsdp_version": 2,
    "fsdp_config": {"auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                    "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT"},
}  # fmt: skip
#: where ``axolotl train`` with ``fsdp_version: 2`` stops on CPU (axolotl 0.19.0, transformers 5.16.1, torch 2.13)
AXOLOTL_FSDP_ON_CPU = (
    "axolotl train with fsdp: needs 2 GPUs: 2 CPU ranks (ACCELERATE_USE_CPU) stop in axolotl/utils/distributed.py:314 "
    "`parallelism_config.build_device_mesh('cuda')` (torch.cuda.set_device on a CPU build: module torch._C has no "
    "attribute _cuda_setDevice); one CPU process loads, prunes and quantizes the plan through the plugin, then "
    "transformers/trainer.py:463 raises `Using fsdp only works in distributed training.` "
    "(test_axolotl_fsdp2_on_cpu_runs_the_plugins_loader_up_to_transformers_check)"
)


@pytest.mark.skipif(not GPUS, reason=AXOLOTL_FSDP_ON_CPU)
def test_axolotl_train_under_fsdp2_with_an_hqq_plan(job):
    """``axolotl train`` with ``fsdp_version: 2`` and the mixed HQQ plan on 2 GPUs: Axolotl turns FSDP on itself
    (``ACCELERATE_USE_FSDP``), accelerate's ``fsdp2_prepare_model`` shards each decoder layer; the frozen uint8
    packed weights stay frozen and unshifted (as in test_fsdp2_shards_hqq_and_matches_one_process)."""
    root, _ = job
    launcher = ["--multi_gpu", "--num_processes", "2", "--main_process_port", "29640"]
    proc = _axolotl(job, "axolotl_fsdp2", launcher, **AXOLOTL_FSDP2)
    _check_axolotl_run(job, proc, root / "axolotl_fsdp2" / "out")


@pytest.mark.skipif(GPUS, reason="on GPUs test_axolotl_train_under_fsdp2_with_an_hqq_plan runs it for real")
def test_axolotl_fsdp2_on_cpu_runs_the_plugins_loader_up_to_transformers_check(job):
    """The same YAML on CPU, one process: the plugin accepts the HQQ plan under ``fsdp`` (``check_sharding``),
    and Axolotl's loader runs its hooks — prune, quantize, LoRA, the measured weights — before transformers'
    Trainer refuses FSDP without a distributed type (see AXOLOTL_FSDP_ON_CPU). The sharding itself, the same
    ``fully_shard`` per decoder layer that accelerate applies, runs on CPU in
    test_fsdp2_shards_hqq_and_matches_one_process."""
    proc = _axolotl(job, "axolotl_fsdp2_cpu", ["--num_processes", "1"], **AXOLOTL_FSDP2)
    log = proc.stdout + proc.stderr
    said = [line for line in log.splitlines() if re.search(r"qra|[Pp]lugin|Error", line)]
    assert proc.returncode != 0
    # pre_model_load, then the quantized model (in full CI runs whose launches inherited the in-process tests'
    # environment, the plugin's lines were missing; launches now start from the session's environment)
    assert "qra: plan" in log and "qra: measured weights" in log, (said[:40], leaked_keys())
    assert "Using fsdp only works in distributed training." in log and "transformers/trainer.py" in log
