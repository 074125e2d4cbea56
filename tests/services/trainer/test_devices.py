"""One code path, CPU or CUDA (services.trainer.devices), checked on the CPU: the flags
(--device, --ddp_backend, --attn_impl) and their refusals naming the flag, the device and
backend the engine picks, micro-batches moved whole, the attention kernel reaching the model,
the RNG state a checkpoint keeps (numpy's too), and mixed precision: a bfloat16 LoRA run on
the CPU trains (the loss falls) with float32 master weights, and a float16 run's loss scaler
is saved and resumed exactly. The same runs on GPUs are in tests/gpu/."""

import json
import pathlib
import random
import threading

import numpy as np
import pytest
import torch

from libs.common.errors import InvalidArgument
from services.trainer import config as trainer_config
from services.trainer import data, devices, modeling, training
from services.trainer.config import TrainConfig


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def problems(count: int, **flags) -> list[str]:
    return devices.problems(TrainConfig(**flags), count=count)


def test_defaults_need_nothing_and_look_nothing_up():
    config = TrainConfig()
    assert (config.device, config.ddp_backend, config.attn_impl) == ("auto", None, None)
    assert devices.problems(config, count=None) == []  # auto, no kernel named: torch's CUDA is not asked


def test_cuda_flags_are_refused_naming_the_flag_on_a_machine_without_cuda():
    torch_build = f"torch {torch.__version__}"
    assert problems(0, device="cuda") == [
        f"device: cuda asked for, but this machine has no CUDA device ({torch_build}); use --device cpu or auto"]
    assert problems(0, ddp_backend="nccl") == [
        "ddp_backend: nccl needs CUDA devices, and this job trains on the CPU; use gloo (the default on the CPU)"]
    assert problems(2, device="cpu", ddp_backend="nccl") == [  # CUDA present, but the job was put on the CPU
        "ddp_backend: nccl needs CUDA devices, and this job trains on the CPU; use gloo (the default on the CPU)"]
    assert problems(0, attn_impl="flash_attention_2") == [
        "attn_impl: flash_attention_2 runs on CUDA devices only, and this job trains on the CPU; use sdpa or eager"]
    assert problems(0, attn_impl="flex_attention") == [
        f"attn_impl: flex_attention has no backward pass on the CPU ({torch_build}); use sdpa or eager, or train on "
        f"a CUDA device"]
    assert problems(0, device="cpu", ddp_backend="gloo", attn_impl="eager") == []


def test_gpu_counts_and_names_are_checked():
    assert problems(2, device="cuda:3") == [
        "device: cuda:3 asked for, but this machine has 2 CUDA device(s) (cuda:0 to cuda:1)"]
    assert problems(2, device="cuda:1") == []
    assert problems(2, device="cuda:1", nproc_per_node=2) == [
        "device: cuda:1 names one GPU, but nproc_per_node 2 starts a process per GPU (each rank takes "
        "cuda:LOCAL_RANK); use --device cuda"]
    assert problems(2, nproc_per_node=4) == [
        "nproc_per_node: 4 processes on this node train on one GPU each, but this machine has 2 CUDA device(s); "
        "lower it, or train on the CPU with --device cpu"]
    assert problems(2, device="cpu", nproc_per_node=4) == []  # CPU ranks: as many as asked
    assert problems(2, ddp_backend="nccl", nproc_per_node=2) == []
    assert problems(1, device="gpu", ddp_backend="mpi", attn_impl="flash") == [
        "device: expected auto, cpu, cuda or cuda:N; got 'gpu'"]
    assert problems(1, ddp_backend="mpi", attn_impl="flash") == [
        "ddp_backend: expected one of nccl, gloo; got 'mpi'",
        "attn_impl: expected one of sdpa, eager, flash_attention_2, flex_attention; got 'flash'"]


def test_trainconfig_reports_them_with_the_rest_and_they_cross_the_proto():
    found = TrainConfig(dataset="d", dataprep_address="a:1", output_dir="/tmp/unused-gpu-path", device="tpu",
                        lora_rank=0).problems()
    assert "device: expected auto, cpu, cuda or cuda:N; got 'tpu'" in found
    assert "lora_rank: must be positive; got 0" in found
    job = dict(dataset="d", dataprep_address="a:1", output_dir="/tmp/unused-gpu-path")
    config = TrainConfig(device="cpu", ddp_backend="gloo", attn_impl="eager", torch_dtype="bfloat16", **job)
    message = trainer_config.to_arguments(config)
    assert (message.device, message.ddp_backend, message.attn_impl) == ("cpu", "gloo", "eager")
    back = trainer_config.from_arguments(message)
    assert (back.device, back.ddp_backend, back.attn_impl, back.torch_dtype) == ("cpu", "gloo", "eager", "bfloat16")
    unset = trainer_config.from_arguments(trainer_config.to_arguments(TrainConfig(**job)))
    assert (unset.device, unset.ddp_backend, unset.attn_impl) == ("auto", None, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU pick; tests/gpu/ covers CUDA")
def test_the_engine_picks_the_cpu_and_gloo_here_and_refuses_what_is_not_here():
    assert devices.resolve(TrainConfig(), local_rank=1) == torch.device("cpu")
    assert devices.backend(TrainConfig(), torch.device("cpu")) == "gloo"
    with pytest.raises(InvalidArgument) as refused:
        devices.resolve(TrainConfig(device="cuda"))
    assert refused.value.field == "device"
    with pytest.raises(InvalidArgument) as refused:
        devices.backend(TrainConfig(ddp_backend="nccl"), torch.device("cpu"))
    assert refused.value.field == "ddp_backend"


def test_a_micro_batch_moves_whole_extras_included():
    rows = [data.Row(np.array([5, 6, 7], dtype=np.int32), np.array([-100, 6, 7], dtype=np.int32),
                     np.array([1, 2], dtype=np.int32)), data.Row(np.array([8, 9], dtype=np.int32),
                                                                  np.array([-100, 9], dtype=np.int32))]
    micro = data.collate(rows, pad_id=0)
    micro.extras["chosen"] = torch.tensor([0, 2])
    moved = micro.to(torch.device("meta"))  # any device but the CPU shows what moved
    tensors = {"input_ids": moved.input_ids, "labels": moved.labels, "attention_mask": moved.attention_mask,
               "position_ids": moved.position_ids, "sample_ids": moved.sample_ids, "chosen": moved.extras["chosen"]}
    assert {name: t.device.type for name, t in tensors.items()} == dict.fromkeys(tensors, "meta")
    assert (moved.tokens, moved.num_samples) == (micro.tokens, micro.num_samples)
    assert micro.input_ids.device.type == "cpu"  # the host copy is untouched
    assert micro.to(torch.device("cpu")).input_ids is micro.input_ids  # already there: no copy


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_attn_impl_reaches_the_policy_and_the_reference(default_model, attn_impl):
    from services.trainer import reference

    config = TrainConfig(attn_impl=attn_impl, train_type="full")
    assert modeling.build_model(config, default_model).config._attn_implementation == attn_impl
    assert reference.load(config, default_model).config._attn_implementation == attn_impl


def test_rng_state_keeps_numpy_and_survives_a_weights_only_load(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    state = training.rng_state()
    assert "cuda" not in state or torch.cuda.is_available()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand(3))
    training.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and np.array_equal(got[2], expected[2])
    old = {"torch": state["torch"], "python": state["python"]}  # a checkpoint from before: numpy as seeded
    np.random.seed(4)
    training.set_rng_state(old)
    assert np.random.rand() == np.random.RandomState(4).rand()


def test_master_weights_and_load_dtypes():
    assert devices.load_dtype(TrainConfig(train_type="full", torch_dtype="bfloat16")) == torch.float32
    assert devices.load_dtype(TrainConfig(train_type="lora", torch_dtype="bfloat16")) == torch.bfloat16
    assert devices.load_dtype(TrainConfig(train_type="lora")) == torch.float32
    layer = torch.nn.Linear(2, 2).to(torch.bfloat16)
    layer.bias.requires_grad_(False)
    devices.master_weights(layer)
    assert (layer.weight.dtype, layer.bias.dtype) == (torch.float32, torch.bfloat16)  # frozen: stays


def test_deepspeed_and_fsdp2_take_the_dtype_as_their_own_mixed_precision(tmp_path):
    from services.trainer import distributed

    world = distributed.World(0, 2, 0)
    preset = distributed.resolved_deepspeed_config(TrainConfig(deepspeed="zero2", torch_dtype="bfloat16"), world)
    assert (preset["bf16"], preset["fp16"]) == ({"enabled": True}, {"enabled": False})
    assert distributed.resolved_deepspeed_config(TrainConfig(deepspeed="zero2"), world)["bf16"] == {"enabled": False}
    bare = tmp_path / "ds.json"
    bare.write_text(json.dumps({"zero_optimization": {"stage": 2}}))  # no bf16/fp16 section: --torch_dtype decides
    resolved = distributed.resolved_deepspeed_config(TrainConfig(deepspeed=str(bare), torch_dtype="float16"), world)
    assert resolved["fp16"] == {"enabled": True} and "bf16" not in resolved
    assert "fp16" not in distributed.resolved_deepspeed_config(TrainConfig(deepspeed=str(bare)), world)
    # engines: autocast only where the back end has no mixed precision of its own; a scaler for float16
    engine = distributed.Engine(torch.nn.Linear(2, 2), None, distributed.World(), TrainConfig(torch_dtype="float16"),
                                torch.device("cpu"))
    assert engine.autocasts and engine.scaler is not None
    plain = distributed.Engine(torch.nn.Linear(2, 2), None, distributed.World(), TrainConfig(), torch.device("cpu"))
    assert not plain.autocasts and plain.scaler is None
    assert distributed.FSDPEngine.own_mixed_precision and distributed.DeepSpeedEngine.own_mixed_precision


# --- whole runs on the CPU (training.train: the real loop, the real dataprep stream)

def run(config: TrainConfig, stop_after: int | None = None, seen: list | None = None) -> list[dict]:
    """training.train; with `stop_after`, stopped there (it publishes that step) and resumed
    from that checkpoint. `seen` collects the trainable parameters' dtypes at the first step."""
    stop = threading.Event()

    def report(event: str, **fields) -> None:
        if event == "progress" and fields["step"] == stop_after:
            stop.set()

    if seen is not None:
        real_step = training.train_step

        def train_step(method, batch, trainable, engine, scheduler, max_grad_norm):
            seen.append({p.dtype for p in trainable})
            seen.append(engine.autocasts)
            return real_step(method, batch, trainable, engine, scheduler, max_grad_norm)

        training.train_step = train_step
    try:
        training.train(config, report, stop)
    finally:
        if seen is not None:
            training.train_step = real_step
    if stop_after is not None:
        config.resume_from_checkpoint = str(pathlib.Path(config.output_dir) / f"checkpoint-{stop_after}")
        training.train(config, lambda *_a, **_k: None)
    return [json.loads(line) for line in (pathlib.Path(config.output_dir) / "logging.jsonl").read_text().splitlines()]


def run_config(prepared_dataset, dataprep_address, out, **overrides) -> TrainConfig:
    values = dict(dataset=prepared_dataset, dataprep_address=dataprep_address, output_dir=str(out), max_steps=8,
                  save_steps=100, per_device_train_batch_size=4, learning_rate=3e-3, lora_rank=16, lora_dropout=0.1,
                  lr_scheduler_type="constant", seed=5)
    return TrainConfig(**{**values, **overrides})


def test_a_bfloat16_lora_run_on_the_cpu_trains_with_float32_master_weights(prepared_dataset, dataprep_address,
                                                                          tmp_path):
    seen: list = []
    entries = run(run_config(prepared_dataset, dataprep_address, tmp_path / "bf16", torch_dtype="bfloat16"),
                  seen=seen)
    assert seen[:2] == [{torch.float32}, True]  # trainable: float32; the forward under autocast
    losses = [e["loss"] for e in entries]
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0], losses
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "bf16" / "checkpoint-8" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}


@pytest.mark.slow
def test_a_float16_run_keeps_its_loss_scale_and_resumes_exactly(prepared_dataset, dataprep_address, tmp_path):
    """float16 on the CPU: the GradScaler's state is in training_state.pt, and a run stopped at
    step 3 and resumed logs bitwise the uninterrupted run's losses, norms and rates (22 s here)."""
    whole = run(run_config(prepared_dataset, dataprep_address, tmp_path / "whole", torch_dtype="float16", max_steps=5))
    resumed = run(run_config(prepared_dataset, dataprep_address, tmp_path / "resumed", torch_dtype="float16",
                             max_steps=5), stop_after=3)
    state = torch.load(tmp_path / "resumed" / "checkpoint-3" / "training_state.pt", weights_only=True)
    assert state["grad_scaler"]["scale"] == 65536.0 and state["grad_scaler"]["_growth_tracker"] == 3
    assert set(state["rng"]) >= {"torch", "python", "numpy"}

    def trajectory(entries):
        return [(e["step"], e["loss"], e["grad_norm"], e["learning_rate"]) for e in entries]

    assert trajectory(resumed) == trajectory(whole)
    assert whole[-1]["loss"] < whole[0]["loss"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusals of a machine without CUDA")
def test_the_trainer_service_refuses_a_device_it_does_not_have(stub, tmp_path):
    import grpc

    from protos.tuneforge.trainer.v1 import trainer_pb2 as pb

    request = pb.SubmitJobRequest(arguments=pb.TrainingArguments(
        dataset=str(tmp_path), dataprep_address="127.0.0.1:1", output_dir=str(tmp_path / "run"), device="cuda",
        ddp_backend="nccl", attn_impl="flash_attention_2"))
    with pytest.raises(grpc.RpcError) as caught:
        stub.SubmitJob(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details()
    assert f"device: cuda asked for, but this machine has no CUDA device (torch {torch.__version__})" in details
    assert "attn_impl: flash_attention_2 needs the flash_attn package" in details
