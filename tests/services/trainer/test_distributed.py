"""Distributed training on CPU with 2 processes (gloo), launched the way the trainer service
launches a job (services.trainer.worker -> torchrun -> ranks): the loss trajectory of 10
steps under DDP, DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2 matches one process with the same
global batch, and the consolidated checkpoint matches its weights; 2 nodes x 1 process on
loopback; a crashed rank fails the job with a message naming it, in bounded time; a resume
from a mid-run checkpoint logs the uninterrupted run's losses, under ZeRO-2 and ZeRO-3 with
the Chinese-LLaMA recipe's modules_to_save on a vocabulary extended by --tokenizer.

Same global batch: 2 ranks x micro-batch 1 x accumulation 2 read rows {0, 2} and {1, 3}
(dataprep gives rank r the rows i with i % 2 == r), one process with micro-batch 1 x
accumulation 4 reads rows 0..3: the same 4 rows per step, the same trained tokens.

Tolerance: losses within 2e-5 relative and final weights within 1e-4 absolute. fp32
gradients summed across ranks in another order differ from one process in the last bits;
Adam divides by sqrt(v), so these differences stay of the order of 1e-7 over 10 steps
(measured, relative on the losses: DDP 1.1e-7, ZeRO-2 7e-8, FSDP2 9e-8, ZeRO-3 full
fine-tuning 6.2e-6, whose loss falls from 7.6 to 1.4 in 10 steps; weights 2.5e-7 or less); the bounds leave room, yet a wrong
normalisation (mean over ranks instead of sum, local instead of global trained tokens)
moves the losses by more than 1e-3, and gradients off by a constant factor (which Adam
would hide) show in the logged gradient norms, held to 5e-4 relative (measured: 4e-7,
except ZeRO-3, whose partitioned norm differs by 1e-5 already at step 1 and up to 7e-5).
"""

from __future__ import annotations

import json
import pathlib
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from libs.common import checkpoint
from services.trainer import launch, training
from services.trainer.config import TrainConfig
from tests.services.trainer.launching import finish, run_worker

STEPS = 10
LOSS_TOLERANCE = 2e-5  # relative
WEIGHT_TOLERANCE = 1e-4
GRAD_NORM_TOLERANCE = 5e-4  # relative


def job(prepared_dataset, dataprep_address, output_dir, **overrides) -> TrainConfig:
    values = dict(dataset=prepared_dataset, dataprep_address=dataprep_address, output_dir=str(output_dir),
                  max_steps=STEPS, save_steps=STEPS, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                  lora_dropout=0.0, learning_rate=5e-4, warmup_ratio=0.1, lr_scheduler_type="cosine", seed=7)
    return TrainConfig(**{**values, **overrides})


def losses(run_dir: pathlib.Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "logging.jsonl").read_text().splitlines()]


def grad_norms(run_dir: pathlib.Path) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (run_dir / "logging.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(prepared_dataset, dataprep_address, tmp_path_factory):
    """One process, the same global batch (micro-batch 1 x accumulation 4): run dirs by
    train type, each trained on first use."""
    runs: dict[str, pathlib.Path] = {}

    class Runs:
        def __getitem__(self, train_type: str) -> pathlib.Path:
            if train_type not in runs:
                out = tmp_path_factory.mktemp(f"single-{train_type}")
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    training.train(job(prepared_dataset, dataprep_address, out, gradient_accumulation_steps=4,
                                  train_type=train_type), lambda *a, **k: None)
                finally:
                    torch.set_num_threads(threads)
                runs[train_type] = out
            return runs[train_type]

    return Runs()


def weights(run_dir: pathlib.Path, train_type: str) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if train_type == "lora" else "model.safetensors"
    return load_file(run_dir / f"checkpoint-{STEPS}" / name)


def assert_matches(run_dir, reference_dir, train_type):
    got, expected = losses(run_dir), losses(reference_dir)
    assert len(got) == len(expected) == STEPS
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, expected))
    print(f"{run_dir.name}: max relative |loss - single-process loss| over {STEPS} steps = {worst:.2e}")
    assert worst <= LOSS_TOLERANCE, (got, expected)
    assert got[-1] < got[0]  # it trained
    # the gradient itself, before clipping: Adam would hide a gradient off by a constant factor
    norms = max(abs(a - b) / b for a, b in zip(grad_norms(run_dir), grad_norms(reference_dir)))
    print(f"{run_dir.name}: max relative |grad norm - single-process grad norm| = {norms:.2e}")
    assert norms <= GRAD_NORM_TOLERANCE
    mine, theirs = weights(run_dir, train_type), weights(reference_dir, train_type)
    assert mine.keys() == theirs.keys()
    delta = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
    print(f"{run_dir.name}: max |weight - single-process weight| = {delta:.2e}")
    assert delta <= WEIGHT_TOLERANCE


BACKENDS = [
    pytest.param({}, "lora", id="ddp-lora"),
    pytest.param({"deepspeed": "zero2"}, "lora", id="zero2-lora", marks=pytest.mark.slow),
    pytest.param({"deepspeed": "zero3"}, "full", id="zero3-full", marks=pytest.mark.slow),
    pytest.param({"fsdp": True}, "lora", id="fsdp-lora", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("backend,train_type", BACKENDS)
def test_two_processes_match_one(backend, train_type, reference, prepared_dataset, dataprep_address, tmp_path):
    out = tmp_path / "run"
    config = job(prepared_dataset, dataprep_address, out, nproc_per_node=2, train_type=train_type, **backend)
    started = time.monotonic()
    extensions = tmp_path / "torch_extensions"  # where torch would JIT-compile DeepSpeed's C++ ops
    code, events, err = finish(run_worker(config, tmp_path, env={"TORCH_EXTENSIONS_DIR": str(extensions)}))
    assert code == 0, err[-3000:]
    print(f"{out.name} {backend or 'ddp'}: {time.monotonic() - started:.1f} s")
    assert not extensions.exists()  # nothing compiled (DeepSpeed's CPU shared-memory op: distributed.py)
    kinds = [e["event"] for e in events]
    assert kinds.count("started") == 1 and kinds[-1] == "done" and kinds.count("checkpoint") == 1
    assert "rank" not in events[0]  # the launcher relays the events as one process's
    assert_matches(out, reference[train_type], train_type)
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert len(state["data_cursors"]) == 2  # every rank's data cursor


@pytest.mark.slow
def test_two_nodes_on_loopback(reference, prepared_dataset, dataprep_address, tmp_path):
    out = tmp_path / "run"
    port = launch.free_port()
    nodes = [run_worker(job(prepared_dataset, dataprep_address, out, nnodes=2, node_rank=rank, master_port=port),
                        tmp_path) for rank in (0, 1)]
    results = [finish(node) for node in nodes]
    for code, _events, err in results:
        assert code == 0, err[-3000:]
    # node 0 holds global rank 0: it publishes; node 1 reports its own progress only
    assert [e["event"] for e in results[0][1]].count("checkpoint") == 1
    assert [e["event"] for e in results[1][1]].count("checkpoint") == 0
    assert [e["event"] for e in results[1][1]][-1] == "done"
    assert_matches(out, reference["lora"], "lora")


def test_a_crashed_rank_fails_the_job_quickly(prepared_dataset, dataprep_address, tmp_path):
    config = job(prepared_dataset, dataprep_address, tmp_path / "run", nproc_per_node=2, max_steps=1000)
    started = time.monotonic()
    code, events, err = finish(run_worker(config, tmp_path, env={launch.FAULT_ENV: "1:3"}), timeout=180)
    seconds = time.monotonic() - started
    errors = [e for e in events if e["event"] == "error"]
    assert code != 0 and len(errors) == 1, err[-3000:]
    assert errors[0]["message"].startswith("rank 1 failed: RuntimeError: injected fault"), errors[0]
    assert "done" not in [e["event"] for e in events]
    assert seconds < 120, f"took {seconds:.0f} s"


def test_ranks_hung_after_done_are_killed_and_the_job_is_done(prepared_dataset, dataprep_address, tmp_path):
    """Both ranks stop (SIGSTOP) where they would exit after a published run, as a rank whose
    teardown deadlocked: the launcher kills them after the grace and the job ends done, exit 0."""
    config = job(prepared_dataset, dataprep_address, tmp_path / "run", nproc_per_node=2, max_steps=2, save_steps=2)
    started = time.monotonic()
    code, events, err = finish(run_worker(config, tmp_path, env={"TUNEFORGE_FAULT": "worker.exit=stop",
                                                                 launch.EXIT_GRACE_ENV: "3"}), timeout=180)
    assert code == 0, err[-3000:]
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "done" and kinds.count("checkpoint") == 1, kinds
    assert "ranks still running after done were killed" in err
    assert training_processes(tmp_path / "job-0.json") == []
    assert time.monotonic() - started < 150


@pytest.mark.slow
def test_nproc_per_node_makes_tuneforge_sft_launch_torchrun(prepared_dataset, dataprep_address, tmp_path,
                                                             monkeypatch, capsys):
    from cli.main import main as tuneforge

    monkeypatch.setenv("NPROC_PER_NODE", "2")
    run = tmp_path / "run"
    code = tuneforge(["sft", "--dataset", prepared_dataset, "--dataprep_address", dataprep_address,
                      "--output_dir", str(run), "--max_steps", "3", "--save_steps", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert out.strip().endswith(f"after 3/3 steps -> {run / 'checkpoint-3'}")
    assert json.loads((run / "checkpoint-3" / "args.json").read_text())["nproc_per_node"] == 2
    assert len(json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())["data_cursors"]) == 2
    assert len(torch.load(run / "checkpoint-3" / "training_state.pt", weights_only=True)["rng"]) == 2


# What each sharded back end adds to a checkpoint of a 2-process LoRA run: every rank's own
# shards (ZeRO-2/3: DeepSpeed's checkpoint; FSDP2: torch.distributed.checkpoint); DDP keeps its
# whole optimizer state in training_state.pt instead.
SHARDS = {
    "ddp": [],
    "fsdp": ["fsdp_state/.metadata", "fsdp_state/__0_0.distcp", "fsdp_state/__1_0.distcp"],
    "zero2": ["global_step3/mp_rank_00_model_states.pt", "global_step3/zero_pp_rank_0_mp_rank_00_optim_states.pt",
              "global_step3/zero_pp_rank_1_mp_rank_00_optim_states.pt", "latest", "zero_to_fp32.py", "zero_to_torch.py"],
    "zero3": ["global_step3/zero_pp_rank_0_mp_rank_00_model_states.pt",
              "global_step3/zero_pp_rank_0_mp_rank_00_optim_states.pt",
              "global_step3/zero_pp_rank_1_mp_rank_00_model_states.pt",
              "global_step3/zero_pp_rank_1_mp_rank_00_optim_states.pt", "latest", "zero_to_fp32.py", "zero_to_torch.py"],
}
ONE_PROCESS_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors", "args.json", "logging.jsonl",
                     "trainer_state.json", "training_state.pt"]
TOKENIZER_FILES = ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]  # saved with --tokenizer
NEW_WORDS = ["zorblaxian", "quuxotic"]


@pytest.fixture(scope="module")
def extended_tokenizer(default_model, tmp_path_factory) -> tuple[str, int]:
    """The default model's tokenizer with NEW_WORDS added, saved; and the base vocabulary's size."""
    tokenizer = AutoTokenizer.from_pretrained(default_model)
    base = len(tokenizer)
    assert tokenizer.add_tokens(NEW_WORDS) == len(NEW_WORDS)
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(out)
    return str(out), base


@pytest.mark.slow
@pytest.mark.parametrize("backend", [pytest.param({}, id="ddp"), pytest.param({"fsdp": True}, id="fsdp"),
                                     pytest.param({"deepspeed": "zero2"}, id="zero2"),
                                     pytest.param({"deepspeed": "zero3"}, id="zero3")])
def test_two_processes_resume_within_1e_6(backend, prepared_dataset, dataprep_address, extended_tokenizer, tmp_path,
                                          request):
    """Resume restores every rank's RNG state (LoRA dropout on) and data cursor, and the
    optimizer state (FSDP2 and ZeRO: each rank writes and reads back its own shards, nothing
    gathered): the steps after a resume from checkpoint-3 log the losses of the
    uninterrupted run. Each rank has 4 rows an epoch, in steps of 3 and 1 micro-batches:
    step 3 ends mid-epoch. Another number of processes is refused at submission.

    ZeRO-2 and ZeRO-3 train the Chinese-LLaMA recipe's setting: LoRA plus modules_to_save
    embed_tokens,lm_head on a vocabulary extended by --tokenizer, so the checkpoint holds the
    whole resized modules, partitioned like the LoRA deltas, and the resume must restore both.
    (One run pair per stage covers plain LoRA and the resized modules: a second pair per stage,
    in its own file, cost about a minute of `make test`.)"""
    name = request.node.callspec.id
    resized = name in ("zero2", "zero3")
    tokenizer, base = extended_tokenizer
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    common = dict(nproc_per_node=2, save_steps=3, lora_dropout=0.1, gradient_accumulation_steps=3, **backend)
    if resized:
        common.update(tokenizer=tokenizer, modules_to_save=["embed_tokens", "lm_head"])
    code, _events, err = finish(run_worker(job(prepared_dataset, dataprep_address, whole, **common), tmp_path))
    assert code == 0, err[-3000:]
    state = json.loads((whole / "checkpoint-3" / "trainer_state.json").read_text())
    assert [c["epoch"] for c in state["data_cursors"]] == [1, 1]  # mid-epoch on both ranks
    manifest = checkpoint.verify(whole / "checkpoint-3")  # the shards are covered by the manifest too
    assert sorted(manifest["files"]) == sorted(ONE_PROCESS_FILES + SHARDS[name] + (TOKENIZER_FILES if resized else []))
    at_3 = load_file(whole / "checkpoint-3" / "adapter_model.safetensors")
    whole_modules = {k: t.shape[0] for k, t in at_3.items() if "embed_tokens" in k or "lm_head" in k}
    if resized:
        assert whole_modules and set(whole_modules.values()) == {base + len(NEW_WORDS)}, whole_modules
        assert len(AutoTokenizer.from_pretrained(whole / "checkpoint-3")) == base + len(NEW_WORDS)
    else:
        assert whole_modules == {}
    saved = torch.load(whole / "checkpoint-3" / "training_state.pt", weights_only=True)
    assert ("optimizer" in saved) == (name == "ddp")
    refused = job(prepared_dataset, dataprep_address, resumed, resume_from_checkpoint=str(whole / "checkpoint-3"),
                  **{**common, "nproc_per_node": 1}).problems()
    assert refused == [f"resume_from_checkpoint: {whole / 'checkpoint-3'} was trained by 2 processes; resume it with "
                       "as many (nproc_per_node x nnodes; this job has 1), or add --resume_only_model true"]
    code, _events, err = finish(run_worker(job(prepared_dataset, dataprep_address, resumed,
                                               resume_from_checkpoint=str(whole / "checkpoint-3"), **common), tmp_path))
    assert code == 0, err[-3000:]
    expected, got = losses(whole), losses(resumed)
    assert len(got) == STEPS
    worst = max(abs(a - b) for a, b in zip(got[3:], expected[3:]))
    print(f"resumed 2-process {backend or 'ddp'}: max |loss - uninterrupted loss| over steps 4-{STEPS} = {worst:.2e}")
    assert worst <= 1e-6
    final, reference_final = weights(resumed, "lora"), weights(whole, "lora")
    assert max(float((final[k] - reference_final[k]).abs().max()) for k in final) <= 1e-6
    if resized:  # the whole modules trained on after the checkpoint
        assert any(not torch.equal(at_3[k], reference_final[k]) for k in whole_modules)


def training_processes(config_path: pathlib.Path) -> list[int]:
    """Pids of live processes whose command line names this job's config file."""
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().split()[2]
        except (OSError, IndexError):
            continue
        if str(config_path).encode() in args and state != "Z":
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_cancel_publishes_and_a_killed_launcher_leaves_no_rank_behind(trainer, prepared_dataset, dataprep_address,
                                                                      tmp_path):
    from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
    from services.trainer import client

    # cancel through the service: every rank stops at the same step, rank 0 publishes
    run = tmp_path / "cancelled"
    job_id = client.submit(trainer.address, job(prepared_dataset, dataprep_address, run, nproc_per_node=2,
                                                max_steps=100000, save_steps=100000))
    for event in client.watch(trainer.address, job_id):
        if event.WhichOneof("event") == "step" and event.step.step >= 3:
            client.cancel(trainer.address, job_id)
            break
    finished = client.wait(trainer.address, job_id)
    assert finished.state == pb.JOB_STATE_CANCELLED, finished.error
    state = json.loads((pathlib.Path(finished.last_checkpoint) / "trainer_state.json").read_text())
    assert state["step"] == finished.step >= 3 and len(state["data_cursors"]) == 2

    # SIGKILL of the job's process (the launcher): torchrun and both ranks go with it
    process = run_worker(job(prepared_dataset, dataprep_address, tmp_path / "killed", nproc_per_node=2,
                             max_steps=100000, save_steps=100000), tmp_path)
    config_path = tmp_path / "job-0.json"
    for line in process.stdout:
        if '"event": "step"' in line:
            break
    assert len(training_processes(config_path)) == 4  # launcher, torchrun, 2 ranks
    process.kill()
    process.wait()
    deadline = time.monotonic() + 30
    while training_processes(config_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert training_processes(config_path) == []


# A Llama of 54.5M parameters (218 MB in fp32) with the default model's tokenizer: big enough
# that a rank holding the whole model, or the whole AdamW state (twice that), shows in its RSS
# above the training peak; small enough to train 2 steps on 2 CPU ranks in seconds.
MEMORY_MODEL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                    num_key_value_heads=16, head_dim=64)


@pytest.fixture(scope="module")
def memory_model(default_model, tmp_path_factory) -> pathlib.Path:
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    where = tmp_path_factory.mktemp("memory-model")
    config = AutoConfig.from_pretrained(default_model)
    for key, value in MEMORY_MODEL.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(where)
    AutoTokenizer.from_pretrained(default_model).save_pretrained(where)
    return where


@pytest.mark.slow
@pytest.mark.parametrize("backend", [pytest.param({"deepspeed": "zero2"}, id="zero2"),
                                     pytest.param({"deepspeed": "zero3"}, id="zero3"),
                                     pytest.param({"fsdp": True}, id="fsdp")])
def test_a_sharded_save_gathers_neither_the_model_nor_the_optimizer_on_any_rank(backend, memory_model,
                                                                                 prepared_dataset, dataprep_address,
                                                                                 tmp_path):
    """Full fine-tuning on 2 ranks, a checkpoint after 2 steps: while a rank saves (its own
    shards, and rank 0 the published model, gathered one parameter at a time) its RSS grows by
    less than a quarter of the model's fp32 size above what it held when the save began, and
    its peak stays below its peak over the training steps. Gathering the whole model onto a
    rank adds the model (ZeRO-3 gathered it on every rank, FSDP2 on rank 0), the whole AdamW
    state twice the model: either fails the first bound. glibc returns freed memory at once
    (MALLOC_MMAP_THRESHOLD_), so RSS follows what is live."""
    out = tmp_path / "run"
    config = job(prepared_dataset, dataprep_address, out, model=str(memory_model), train_type="full",
                 nproc_per_node=2, max_steps=2, save_steps=2, gradient_accumulation_steps=1, **backend)
    started = time.monotonic()
    code, events, err = finish(run_worker(config, tmp_path, env={"MALLOC_MMAP_THRESHOLD_": "65536"}))
    assert code == 0, err[-3000:]
    model_bytes = sum(t.numel() * t.element_size() for t in load_file(memory_model / "model.safetensors").values())
    rss = [e for e in events if e["event"] == "checkpoint"][0]["rss_bytes"]
    assert len(rss["train_peak"]) == len(rss["save_start"]) == len(rss["save_peak"]) == 2
    mib = 2**20
    for rank, (train, start, save) in enumerate(zip(rss["train_peak"], rss["save_start"], rss["save_peak"])):
        print(f"{backend}: rank {rank}: peak RSS training {train / mib:.0f} MiB; saving from {start / mib:.0f} MiB "
              f"to a peak of {save / mib:.0f} MiB (+{(save - start) / model_bytes:.2f} x the model's "
              f"{model_bytes / mib:.0f} MiB)")
    for train, start, save in zip(rss["train_peak"], rss["save_start"], rss["save_peak"]):
        assert save - start <= model_bytes / 4
        assert save <= train
    published = load_file(out / "checkpoint-2" / "model.safetensors")
    assert published.keys() == load_file(memory_model / "model.safetensors").keys()
    print(f"{backend}: {time.monotonic() - started:.1f} s")
