"""GRPO LoRA steps/s of TuneForge's trainer against TRL 1.16's GRPOTrainer, in one run on this
CPU: ours generating on vLLM (colocated in the trainer, and on TuneForge's own serving
service), ours with transformers generation (the like-for-like baseline), and TRL with
transformers generation (as TRL runs without a GPU: its vLLM server mode syncs weights over
NCCL and refuses to off CUDA).

The same model (the default model; or --model; or --fixture_model, a random-init Llama), the
same prompts (user turns cut from the default model's corpus, prepared once as a prompt-task
dataset by a real dataprep service process; TRL gets the same conversations and the bench
checks that TRL's chat-template tokenization of each equals the prompt ids our trainer reads),
the same LoRA config (r 8, alpha 32, dropout 0, all-linear), the same reward (`short_answer` in
a plugin file written here: ours loads it with --external_plugins, TRL gets that very function
imported from the file), G completions per prompt, the same max_completion_length, batch and
steps, and the GRPO options set to ms-swift's semantics on both sides (TRL's defaults differ):
loss_type grpo, beta 0.04 (KL to the reference = the base with the adapter disabled), epsilon
0.2, scale_rewards group, num_iterations 1, temperature 0.9, top_p 1, top_k off, TRL's
use_bias_correction_kl off; lr 1e-5 constant, weight decay 0.1, clip 1.0, float32, prompts in
file order (TRL's shuffle_dataset off, ours --dataset_shuffle false). Ours is the product's
own path: services.trainer.training.train with the grpo method, reading the prompt rows over
gRPC from the dataprep service; in server mode generating through the serving service's
RolloutService, started here as its own process (stopped while the other trainers run) with
the policy's adapter pushed to it at every step. Every process's torch (and vLLM) thread pool
is --threads wide. The serving process is started as docs/serving.md advises for a rollout
server that shares its cores with a trainer: VLLM_ENABLE_V1_MULTIPROCESSING=0 (its model in
vLLM's engine-core process, no worker process spinning on a shared-memory queue for a second
after each batch; --serving_engine worker-process for vLLM's CPU default), --max_lora_rank
the policy's rank (--serving_max_lora_rank) and --lora_merge_single true (a rollout runs one
adapter: the base weights with it merged in; --serving_lora_merge_single false to compare).

Each trainer runs alone in its own process, one at a time, the order reversed every round;
the median over rounds is kept. A step's time is wall time from the end of the previous step
(prompt reading, generation, reward, reference log-probs, weight sync and training included);
the first WARMUP steps are not timed (nor the vLLM engine's start, which precedes step 1).
Beside it, the CPU time over the same span, of the trainer's process and in server mode also of
the serving process and its engine: on a machine other processes share, CPU time moves much
less with their load than wall time does (and it counts the serving process's work, which wall
time alone would hide on a machine with spare cores). The time split per step: ours from the
trainer's own phase timings (the phase_seconds of each step's progress report, logging.jsonl's
*_seconds); TRL's by wrapping its own methods on the trainer instance: `_generate_single_turn` (generation), `_calculate_rewards` (reward),
`_get_per_token_logps_and_entropies` while a rollout is being scored (reference log-probs),
`_generate_and_score_completions` (the rollout; other = the rest of it: tokenizing, decoding,
advantages, metrics), and train = step - the rollout. Mean completion tokens per step are
printed beside: generation time depends on them, and vLLM and transformers sample different
completions from the same seed.

    .venv/bin/python bench/grpo_vs_trl.py [--steps 12] [--warmup 2] [--rounds 3] [--threads 1]
        [--num_generations 8] [--batch 16] [--max_completion_length 128] [--model DIR | --fixture_model]
        [--kinds trl ours-colocate ours-server ours-colocate-async ours-server-async ours-transformers]

The -async kinds train with --async_generate true: the next rollout is generated in the
background (colocate: the in-process engine on a thread; server: the Generate RPC on a thread)
while this one trains; their "generation" row is the time a step waited for it, the
"generation in background" row its own duration, overlapped with the step's other phases.

Target: ours (vLLM colocate and vLLM server) >= 2x TRL's steps/s. Not part of the test run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import fixtures  # bench/fixtures.py: the model and texts the benchmarks share

REPO = pathlib.Path(__file__).resolve().parents[1]

LORA = dict(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
OPTIM = dict(learning_rate=1e-5, weight_decay=0.1, max_grad_norm=1.0, seed=42)
# ms-swift's GRPO semantics, set explicitly on both sides
GRPO = dict(loss_type="grpo", beta=0.04, epsilon=0.2, scale_rewards="group", num_iterations=1, temperature=0.9,
            top_p=1.0)
REWARD = "short_answer"
PLUGIN = f'''"""The benchmark's reward: short answers score higher (1 for an empty completion, 0 at 64
tokens, negative beyond). Loaded by TuneForge with --external_plugins, imported by TRL."""


def {REWARD}(completions, completion_ids, **kwargs):
    return [1.0 - len(ids) / 64 for ids in completion_ids]
'''
KINDS = {  # worker kind -> (column heading, generation)
    "trl": ("TRL, HF generate", None),
    "ours-colocate": ("vLLM colocate", "colocate"),
    "ours-server": ("vLLM server", "server"),
    "ours-colocate-async": ("colocate, async", "colocate"),  # --async_generate true
    "ours-server-async": ("server, async", "server"),
    "ours-transformers": ("HF generate", "transformers"),
}
MODEL_SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                   num_key_value_heads=8, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True)
ASYNC = ("ours-colocate-async", "ours-server-async")
SERVING_ENGINES = {"in-core": "0", "worker-process": "1"}  # --serving_engine -> VLLM_ENABLE_V1_MULTIPROCESSING
PHASES = {"generation": "generation (waited for)", "ahead": "generation in background (async)", "reward": "reward", "logps": "reference + old log-probs", "sync": "weight sync",
          "train": "train (forward, backward, optimizer)", "other": "other"}


# ----------------------------------------------------------------------------- set-up (parent)

def write_prompts(path: pathlib.Path, rows: int, seed: int = 0) -> None:
    """Prompt-only conversations: one user turn of 5 to 40 words from the default model's corpus."""
    rng = random.Random(seed)
    text = fixtures.excerpts(rng)
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"messages": [{"role": "user", "content": text(rng.randint(5, 40))}]}) + "\n")


def prepare(address: str, model_dir: pathlib.Path, raw: pathlib.Path, out: pathlib.Path) -> dict:
    from libs.dataset import client
    from services.dataprep.config import PrepareConfig

    return client.prepare(address, PrepareConfig(model=str(model_dir), dataset=[str(raw)], output_dir=str(out),
                                                 task="prompt"))


def prompts_for_trl(address: str, dataset_dir: pathlib.Path, model_dir: pathlib.Path, raw: pathlib.Path,
                    out: pathlib.Path) -> tuple[int, float]:
    """TRL's dataset (a `prompt` column of conversations, the raw rows in file order), written
    after checking that TRL's tokenization of each (apply_chat_template with the generation
    prompt, as GRPOTrainer._tokenize_prompts does) is the prompt our trainer reads over gRPC.
    Returns (prompts, mean prompt tokens)."""
    from transformers import AutoTokenizer

    from libs.dataset.client import read_batches
    from services.trainer.data import batch_rows

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ours = [row.input_ids.tolist() for batch, _cursor in read_batches(address, str(dataset_dir), max_batch_rows=256)
            for row in batch_rows(batch)]
    conversations = [json.loads(line)["messages"] for line in raw.read_text().splitlines()]
    if len(ours) != len(conversations):
        sys.exit(f"dataprep kept {len(ours)} of {len(conversations)} prompts: see its rejects")
    with open(out, "w") as f:
        for i, (messages, ids) in enumerate(zip(conversations, ours)):
            theirs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
            if list(theirs) != ids:
                sys.exit(f"prompt {i}: TRL would tokenize it as {list(theirs)[:12]}..., ours reads {ids[:12]}...: "
                         "the trainers would not see the same prompts")
            f.write(json.dumps({"prompt": messages}) + "\n")
    return len(ours), statistics.mean(len(ids) for ids in ours)


# ----------------------------------------------------------------------------- workers (one process each)

def cpu_clock(serving_pid: int | None):
    """CPU seconds so far of this process and, in server mode, of the serving process and its
    children (its engine core): on a machine other processes share, CPU time moves much less
    with their load than wall time does."""
    serving = None
    if serving_pid is not None:
        import psutil  # a dependency of vLLM

        serving = psutil.Process(serving_pid)

    def now() -> float:
        spent = time.process_time()
        if serving is not None:
            for process in [serving, *serving.children(recursive=True)]:
                times = process.cpu_times()
                spent += times.user + times.system
        return spent

    return now


def summarise(times: list[float], cpu: list[float], phases: list[dict[str, float]], lengths: list[float],
              warmup: int) -> dict:
    per_step = {"step_seconds": [round(t, 3) for t in times]}
    times, cpu, phases, lengths = times[warmup:], cpu[warmup:], phases[warmup:], lengths[warmup:]
    split = {phase: statistics.median(p.get(phase, 0.0) for p in phases) for phase in PHASES}
    return {**per_step, "steps": len(times), "steps_per_second": len(times) / sum(times),
            # robust to another process taking the cores for a while (this machine is shared)
            "median_steps_per_second": 1 / statistics.median(times), "median_step_seconds": statistics.median(times),
            "steps_per_cpu_second": len(times) / sum(cpu), "phase_seconds": split,
            "completion_tokens": statistics.mean(lengths) if lengths else float("nan")}


def worker_ours(spec: dict) -> dict:
    import torch

    from services.trainer import training
    from services.trainer.config import GrpoConfig, TrainConfig

    torch.set_num_threads(spec["threads"])
    mode = spec["generation"]
    config = TrainConfig(model=spec["model"], dataset=spec["dataset"], dataprep_address=spec["dataprep"],
                         output_dir=spec["output_dir"], train_type="lora", lora_rank=LORA["r"],
                         lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                         target_modules=["all-linear"],
                         lr_scheduler_type="constant", per_device_train_batch_size=spec["batch"],
                         gradient_accumulation_steps=1, max_steps=spec["steps"], save_steps=10**6, logging_steps=1,
                         rlhf_type="grpo",
                         grpo=GrpoConfig(num_generations=spec["num_generations"],
                                         max_completion_length=spec["max_completion_length"], top_k=-1,
                                         reward_funcs=[REWARD], external_plugins=[spec["plugin"]],
                                         async_generate=spec["async"], **GRPO),
                         use_vllm=mode != "transformers", vllm_mode="server" if mode == "server" else "colocate",
                         vllm_server_host=spec.get("serving_host"), vllm_server_port=spec.get("serving_port", 8000),
                         # file order, as TRL's with shuffle_dataset off: the same prompts a step
                         dataset_shuffle=False,
                         vllm_enable_lora=spec["vllm_enable_lora"], **OPTIM)
    times, cpu, phases = [], [], []
    clock = cpu_clock(spec.get("serving_pid"))
    last_cpu = [clock()]

    def report(event: str, **fields: object) -> None:
        now = clock()
        if event == "progress":
            cpu.append(now - last_cpu[0])
            times.append(float(fields["seconds"]))
            given = dict(fields.get("phase_seconds") or {})
            # --async_generate: the step waits generation_wait of the generation that ran beside the last step's training
            waited = given.get("generation_wait", given.get("generation", 0.0)) if spec["async"] else None
            split = {"generation": given.get("generation", 0.0) if waited is None else waited,
                     "reward": given.get("reward", 0.0),
                     "logps": given.get("reference", 0.0) + given.get("old_logps", 0.0),
                     "sync": given.get("sync", 0.0), "train": given.get("train", 0.0)}
            split["other"] = float(fields["seconds"]) - sum(split.values())  # prompt reading, advantages, batching
            split["ahead"] = given.get("generation", 0.0) if "generation_wait" in given else 0.0
            phases.append(split)
        last_cpu[0] = now  # "started", then each step and its log: the span a step's wall time covers

    training.train(config, report)
    logged = (pathlib.Path(spec["output_dir"]) / "logging.jsonl").read_text().splitlines()
    by_step = {entry["step"]: entry["completions/mean_length"] * spec["batch"] for entry in map(json.loads, logged)
               if "completions/mean_length" in entry}  # logging_steps 1: one entry a step
    lengths = [by_step[step] for step in sorted(by_step)]
    return summarise(times, cpu, phases, lengths, spec["warmup"])


def worker_trl(spec: dict) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(spec["threads"])
    plugin = importlib.util.spec_from_file_location("bench_reward_plugin", spec["plugin"])
    module = importlib.util.module_from_spec(plugin)
    plugin.loader.exec_module(module)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    args = GRPOConfig(output_dir=spec["output_dir"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
                      gradient_accumulation_steps=1, num_generations=spec["num_generations"],
                      max_completion_length=spec["max_completion_length"], top_k=0, **GRPO,
                      use_bias_correction_kl=False, shuffle_dataset=False, lr_scheduler_type="constant",
                      logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                      bf16=False, fp16=False, gradient_checkpointing=False, **OPTIM)
    trainer = GRPOTrainer(model=model, reward_funcs=[getattr(module, REWARD)], args=args,
                          train_dataset=load_dataset("json", data_files=spec["trl_rows"], split="train"),
                          processing_class=tokenizer, peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))

    spent: dict[str, float] = {}
    scoring = [False]  # inside _generate_and_score_completions: log-prob passes there are the reference's (and old)

    def timed(name: str, phase, guard=None):
        method = getattr(trainer, name)

        def wrapper(*a, **kw):
            if guard is not None and not guard():
                return method(*a, **kw)
            started = time.perf_counter()
            try:
                return method(*a, **kw)
            finally:
                spent[phase] = spent.get(phase, 0.0) + time.perf_counter() - started

        setattr(trainer, name, wrapper)

    def flagged(name: str):
        method = getattr(trainer, name)

        def wrapper(*a, **kw):
            scoring[0] = True
            started = time.perf_counter()
            try:
                return method(*a, **kw)
            finally:
                scoring[0] = False
                spent["rollout"] = spent.get("rollout", 0.0) + time.perf_counter() - started

        setattr(trainer, name, wrapper)

    timed("_generate_single_turn", "generation")
    timed("_calculate_rewards", "reward")
    timed("_get_per_token_logps_and_entropies", "logps", guard=lambda: scoring[0])
    flagged("_generate_and_score_completions")

    times, cpu, phases, lengths = [], [], [], []

    class Clock(TrainerCallback):
        last = last_cpu = None

        def on_train_begin(self, *_args, **_kwargs):
            Clock.last, Clock.last_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, *_args, **_kwargs):
            now, now_cpu = time.perf_counter(), time.process_time()
            seconds = now - Clock.last
            times.append(seconds)
            cpu.append(now_cpu - Clock.last_cpu)
            Clock.last, Clock.last_cpu = now, now_cpu
            split = {phase: spent.get(phase, 0.0) for phase in ("generation", "reward", "logps")}
            # the rest of the rollout's scoring: tokenizing, decoding, advantages, metrics
            split["other"] = spent.get("rollout", 0.0) - sum(split.values())
            split["train"] = seconds - spent.get("rollout", 0.0)
            phases.append(split)
            spent.clear()

        def on_log(self, _args, _state, _control, logs=None, **_kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"] * spec["batch"])

    trainer.add_callback(Clock())
    trainer.train()
    return summarise(times, cpu, phases, lengths, spec["warmup"])


def run_worker(kind: str, spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", kind, "--spec", json.dumps(spec)],
                          capture_output=True, text=True, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT=")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{kind} worker failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT="))


def stop_serving(stack) -> None:
    """Stops the serving process alone (dataprep keeps running for the next trainers)."""
    serving = stack.processes.pop("serving")
    serving.popen.send_signal(signal.SIGTERM)
    try:
        serving.popen.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(serving.popen.pid, signal.SIGKILL)
        serving.popen.wait()


# ----------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="completions per step (a multiple of num_generations)")
    parser.add_argument("--max_completion_length", type=int, default=128)
    parser.add_argument("--rows", type=int, default=200)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", help="model directory (default: the default model)")
    which.add_argument("--fixture_model", action="store_true",
                       help=f"a random-init Llama built here (bench/fixtures.py, hidden {MODEL_SHAPE['hidden_size']} x "
                            f"{MODEL_SHAPE['num_hidden_layers']} layers, about 20M parameters): it never stops early, "
                            "so every completion is max_completion_length tokens")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--serving_max_lora_rank", type=int, default=LORA["r"],
                        help="the serving process's --max_lora_rank (default: the policy's rank, the smallest slot "
                             "that holds it; serving's own default is 16). vLLM's CPU LoRA kernels gather each "
                             "token's adapter weights at the slot rank, so a rollout server sized for its job's "
                             "rank generates faster")
    parser.add_argument("--serving_lora_merge_single", choices=["true", "false"], default="true",
                        help="the serving process's --lora_merge_single: a rollout (one adapter for every token) "
                             "multiplied by the base weights with the adapter merged in, instead of vLLM's CPU LoRA "
                             "ops (docs/serving.md); false: vLLM's ops, to compare")
    parser.add_argument("--serving_engine", choices=list(SERVING_ENGINES), default="in-core",
                        help="in-core: the serving process started with VLLM_ENABLE_V1_MULTIPROCESSING=0; "
                             "worker-process: vLLM's CPU default (docs/serving.md)")
    parser.add_argument("--vllm_enable_lora", choices=["unset", "true", "false"], default="unset",
                        help="ours: --vllm_enable_lora (unset: the product's default, the adapter merged into the "
                             "colocated engine's weights, the adapter itself to the serving service; true: the "
                             "adapter to both)")
    parser.add_argument("--first", choices=["ours", "trl"], default="trl",
                        help="which runs first in round 1 (the order is reversed every round): run the bench "
                             "once with each to see both orders from round 1")
    parser.add_argument("--worker", choices=list(KINDS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.spec)
        result = worker_trl(spec) if args.worker == "trl" else worker_ours(spec)
        print("RESULT=" + json.dumps(result), flush=True)
        return 0
    if args.batch % args.num_generations:
        parser.error(f"--batch {args.batch} must be a multiple of --num_generations {args.num_generations}")
    if "trl" not in args.kinds:
        parser.error("--kinds must include trl (the baseline every ratio is to)")

    from cli.stack import Stack
    from libs.default_model.resolve import resolve_model

    kinds = ["trl", *(k for k in args.kinds if k != "trl")]  # the baseline first; --first ours reverses
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        root = pathlib.Path(tmp)
        if args.fixture_model:
            fixtures.random_llama(root / "model", MODEL_SHAPE)
            model_dir = root / "model"
        else:
            model_dir = pathlib.Path(args.model).resolve() if args.model else resolve_model(None)
        # the serving engine's thread pool as wide as the trainers' torch pools (vLLM's CPU default binds one
        # thread to each core of the NUMA node; the colocated engine uses the trainer's own pool)
        stack = Stack(root / "logs", env={"OMP_NUM_THREADS": str(args.threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                                          "VLLM_ENABLE_V1_MULTIPROCESSING": SERVING_ENGINES[args.serving_engine]})
        try:
            address = stack.start_dataprep().grpc_address
            write_prompts(root / "prompts.jsonl", args.rows)
            prepare(address, model_dir, root / "prompts.jsonl", root / "prompts")
            (root / "reward_plugin.py").write_text(PLUGIN)
            count, prompt_tokens = prompts_for_trl(address, root / "prompts", model_dir, root / "prompts.jsonl",
                                                   root / "trl_rows.jsonl")
            print(f"model: {model_dir} ; {count} prompts (mean {prompt_tokens:.1f} tokens), G {args.num_generations}, "
                  f"batch {args.batch} completions ({args.batch // args.num_generations} prompts) a step, "
                  f"max_completion_length {args.max_completion_length}, {args.steps} steps ({args.warmup} warm-up), "
                  f"{args.threads} threads, {args.rounds} rounds, serving --max_lora_rank {args.serving_max_lora_rank} "
                  f"--lora_merge_single {args.serving_lora_merge_single} {args.serving_engine}, "
                  f"--vllm_enable_lora {args.vllm_enable_lora}",
                  file=sys.stderr)
            results: dict[str, list[dict]] = {kind: [] for kind in kinds}
            first = kinds if args.first == "trl" else kinds[::-1]
            for round_ in range(args.rounds):
                for kind in (first if round_ % 2 == 0 else first[::-1]):  # both orders
                    spec = {"model": str(model_dir), "dataprep": address, "dataset": str(root / "prompts"),
                            "trl_rows": str(root / "trl_rows.jsonl"), "plugin": str(root / "reward_plugin.py"),
                            "output_dir": str(root / f"{kind}-{round_}"), "steps": args.steps, "warmup": args.warmup,
                            "threads": args.threads, "batch": args.batch, "num_generations": args.num_generations,
                            "max_completion_length": args.max_completion_length, "generation": KINDS[kind][1],
                            "async": kind in ASYNC,
                            "vllm_enable_lora": {"unset": None, "true": True, "false": False}[args.vllm_enable_lora]}
                    serving = None
                    if KINDS[kind][1] == "server":  # up only while its trainer runs: idle, it would still hold memory
                        serving = stack.start_serving(model=str(model_dir), extra=[
                            "--max_lora_rank", str(args.serving_max_lora_rank),
                            "--lora_merge_single", args.serving_lora_merge_single])
                        spec["serving_host"], spec["serving_port"] = "127.0.0.1", int(serving.ready["grpc_port"])
                        spec["serving_pid"] = serving.popen.pid
                    try:
                        result = run_worker(kind, spec)
                    finally:
                        if serving is not None:
                            stop_serving(stack)
                    results[kind].append(result)
                    print(f"round {round_ + 1} {kind}: {result['median_steps_per_second']:.3f} steps/s (median step), "
                          f"{result['steps_per_second']:.3f} aggregate, "
                          f"{result['steps_per_cpu_second']:.3f} per CPU second, "
                          f"{result['completion_tokens']:.0f} completion "
                          f"tokens/step, step seconds {result['step_seconds']}, load average {os.getloadavg()[0]:.1f}",
                          file=sys.stderr)
        finally:
            stack.stop()

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    def phase(kind: str, name: str) -> float:
        return statistics.median(r["phase_seconds"][name] for r in results[kind])

    baseline = median("trl", "median_steps_per_second")
    width = 20
    print(f"{'':<34}" + "".join(f"{kind:>{width}}" for kind in kinds))
    print(f"{'':<34}" + "".join(f"{KINDS[kind][0]:>{width}}" for kind in kinds))
    print(f"{'steps/s (median step)':<34}" + "".join(f"{median(k, 'median_steps_per_second'):>{width}.3f}"
                                                      for k in kinds))
    print(f"{'steps/s (aggregate)':<34}" + "".join(f"{median(k, 'steps_per_second'):>{width}.3f}" for k in kinds))
    print(f"{'steps per CPU second':<34}" + "".join(f"{median(k, 'steps_per_cpu_second'):>{width}.3f}"
                                                     for k in kinds))
    print(f"{'ratio to TRL (median step)':<34}" + "".join(
        f"{median(k, 'median_steps_per_second') / baseline:>{width - 1}.2f}x" for k in kinds))
    print(f"{'ratio to TRL (CPU time)':<34}" + "".join(
        f"{median(k, 'steps_per_cpu_second') / median('trl', 'steps_per_cpu_second'):>{width - 1}.2f}x"
        for k in kinds))
    print(f"{'completion tokens / step':<34}" + "".join(f"{median(k, 'completion_tokens'):>{width}.0f}" for k in kinds))
    print("time split, seconds per step (median over steps, then rounds); TRL: reference + old log-probs = its "
          "log-prob passes while scoring a rollout, "
          "other = the rest of _generate_and_score_completions, train = step - _generate_and_score_completions; "
          "ours: other = step - the trainer's phases (prompt reading, advantages, micro-batches)")
    for name, label in PHASES.items():
        cells = []
        for k in kinds:
            absent = k == "trl" and name in ("sync", "ahead")  # TRL's transformers path generates with the policy itself
            cells.append(f"{'-':>{width}}" if absent else f"{phase(k, name):>{width}.3f}")
        print(f"{'  ' + label:<34}" + "".join(cells))
    for kind in ("ours-colocate", "ours-server", *ASYNC):
        if kind in kinds:
            for key, what in (("median_steps_per_second", "wall, median step"), ("steps_per_cpu_second", "CPU time")):
                ratio = median(kind, key) / median("trl", key)
                print(f"target: {kind} steps/s >= 2x TRL's ({what}): {ratio:.2f}x "
                      f"({'met' if ratio >= 2 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
