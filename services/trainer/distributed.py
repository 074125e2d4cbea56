"""Data-parallel training across processes: which rank this process is (from torchrun's
RANK / WORLD_SIZE / LOCAL_RANK), the process group (gloo on CPU, nccl on CUDA, with a
timeout so a lost peer fails the job instead of hanging it), and one `Engine` per back end
that the SFT recipe drives the same way: forward, backward, step, global sums, and the
checkpoint: sharded back ends (ZeRO, FSDP2) write each rank's own optimizer and parameter
shards, and rank 0 the published model files, gathered one parameter at a time.

Back ends: one process (no wrapping), DDP, DeepSpeed ZeRO-2 / ZeRO-3 (`--deepspeed zero2|
zero3|path.json`) and FSDP2 (`--fsdp true`, torch.distributed.fsdp.fully_shard).

Loss semantics are those of one process with the same global batch: every rank divides its
summed token losses by the trained tokens of the whole step summed over all ranks, and the
loss is multiplied by the world size before backward because every back end averages
gradients across ranks; the gradient is then the single-process one.

torch, deepspeed and transformers are imported inside functions: the config checks here run
in the CLI and the service, which must not pay for them.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
from dataclasses import dataclass
from typing import Any

from services.trainer import vocabulary

DEEPSPEED_PRESETS = ("zero2", "zero3")
# Sections of a DeepSpeed JSON that TuneForge owns itself: the optimizer is always the
# recipe's AdamW and the schedule its --lr_scheduler_type, so runs compare across back ends.
DEEPSPEED_OWNED = ("optimizer", "scheduler")


def _preset(stage: int) -> dict[str, Any]:
    """ms-swift's zero2.json / zero3.json, "auto" values filled in from the job's config."""
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
                            "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    return {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "steps_per_print": 1e9,
            "wall_clock_breakdown": False}


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (torchrun's environment)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone publishes checkpoints and writes the run directory."""
        return self.rank == 0

    @property
    def reports(self) -> bool:
        """The first process of each node reports the job's progress to its launcher."""
        return self.local_rank == 0


def world_from_env(environ: dict[str, str] | None = None) -> World:
    environ = os.environ if environ is None else environ
    return World(int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1)), int(environ.get("LOCAL_RANK", 0)))


# --- configuration checks (no torch)

def deepspeed_json(value: str) -> dict[str, Any]:
    """The DeepSpeed config named by --deepspeed: a preset or a JSON file. Raises ValueError
    with a one-line reason."""
    if value in DEEPSPEED_PRESETS:
        return _preset(int(value[-1]))
    path = pathlib.Path(value)
    if not value.endswith(".json"):
        raise ValueError(f"expected {', '.join(DEEPSPEED_PRESETS)} or a .json file; got {value!r}")
    if not path.is_file():
        raise ValueError(f"{value}: no such file")
    try:
        loaded = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{value}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{value}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{value}: expected a JSON object")
    owned = [key for key in DEEPSPEED_OWNED if key in loaded]
    if owned:
        raise ValueError(f"{value}: {', '.join(owned)}: TuneForge sets the optimizer (AdamW) and the learning-rate "
                         f"schedule (--lr_scheduler_type) itself; remove this section")
    zero = loaded.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"{value}: zero_optimization: expected a JSON object; got {json.dumps(zero)[:80]}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ValueError(f"{value}: zero_optimization.stage: expected 0, 1, 2 or 3; got {json.dumps(stage)[:80]}")
    if zero.get("offload_optimizer") or zero.get("offload_param"):
        raise ValueError(f"{value}: zero_optimization.offload_*: offloading is not supported by this trainer yet")
    return loaded


def problems(config, check_files: bool = True) -> list[str]:
    """Problems of the distributed fields of a TrainConfig, each naming its field; with
    `check_files` false the --deepspeed file is not read (its path is unusable, said elsewhere)."""
    found: list[str] = []
    if config.nproc_per_node < 1:
        found.append(f"nproc_per_node: must be at least 1; got {config.nproc_per_node}")
    if config.nnodes < 1:
        found.append(f"nnodes: must be at least 1; got {config.nnodes}")
    elif not 0 <= config.node_rank < config.nnodes:
        found.append(f"node_rank: expected 0 <= node_rank < nnodes ({config.nnodes}); got {config.node_rank}")
    if config.master_port is not None and not 0 < config.master_port < 65536:
        found.append(f"master_port: expected a TCP port (1-65535); got {config.master_port}")
    if config.nnodes > 1 and config.master_port is None:
        found.append("master_port: required with nnodes > 1 (every node must name the same port)")
    if config.ddp_timeout <= 0:
        found.append(f"ddp_timeout: must be positive; got {config.ddp_timeout}")
    if config.deepspeed and check_files:
        try:
            deepspeed_json(config.deepspeed)
        except ValueError as exc:
            found.append(f"deepspeed: {exc}")
        if config.fsdp:
            found.append("fsdp: cannot be combined with deepspeed; choose one back end")
    return found


# --- process group

def init(config) -> World:
    """Joins the process group when started by torchrun with more than one process (the
    backend from devices.backend); on CUDA, makes the rank's device the current one."""
    import torch
    import torch.distributed as dist

    from services.trainer import devices

    world = world_from_env()
    device = devices.resolve(config, world.local_rank)
    if device.type == "cuda":  # collectives and bitsandbytes' loading use the current device
        torch.cuda.set_device(device)
    if not world.distributed or dist.is_initialized():
        return world
    backend = devices.backend(config, device)
    timeout = datetime.timedelta(seconds=config.ddp_timeout)
    if config.deepspeed:
        import deepspeed

        if device.type == "cpu":
            _skip_shared_memory_op()
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    return world


def _skip_shared_memory_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a C++ shared-memory allreduce when its process group
    starts: a minute of compiling per machine and per venv path, and a rank killed while it
    compiles leaves torch's lock file behind, on which every later job waits forever. Only its
    `inference_all_reduce` uses that op (training's collectives are gloo's), so it is not built."""
    import importlib

    # by module name: the attribute `deepspeed.comm.torch` is PyTorch itself (deepspeed.comm imports torch)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def close() -> None:
    """Leaves the process group once every rank is done (rank 0 may still be publishing:
    a rank tearing down its side early made the others abort at exit)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_sum(values: list[float], world: World) -> list[float]:
    """Element-wise sums over every rank (the values themselves in one process)."""
    if not world.distributed:
        return list(values)
    import torch
    import torch.distributed as dist

    # where the backend reduces: nccl on the current CUDA device, gloo on the CPU
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_max(value: int, world: World) -> int:
    if not world.distributed:
        return value
    import torch.distributed as dist

    gathered: list[Any] = [None] * world.world_size
    dist.all_gather_object(gathered, value)
    return max(gathered)


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's `value` on every rank (a picklable plain value)."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    objects = [value]
    dist.broadcast_object_list(objects, src=0)
    return objects[0]


def gather(value: Any, world: World) -> list[Any]:
    """`value` of every rank, in rank order, on every rank (picklable plain values)."""
    if not world.distributed:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world.world_size
    dist.all_gather_object(gathered, value)
    return gathered


# --- engines

class Engine:
    """One process, and the base of the data-parallel engines: forward on `model` (its
    inputs moved to the rank's device, under autocast when --torch_dtype is mixed and the
    back end has no mixed precision of its own), `backward` per micro-batch (the loss
    scaled for float16), `step` once per optimizer step. Without `config` and `device` it
    runs in float32 wherever the inputs are (tests driving the engine by hand)."""

    name = "single"
    # Back ends whose ranks each hold a shard of the optimizer state write it into the
    # checkpoint themselves (save_shards / load_shards); the others' whole optimizer state
    # goes into training_state.pt (optimizer_state / load_optimizer_state).
    sharded = False
    SHARD_FILES = ""  # what a sharded back end's checkpoint holds, for error messages
    own_mixed_precision = False  # the back end casts itself (DeepSpeed bf16/fp16, FSDP2's policy)
    own_loss_scaler = False  # DeepSpeed's fp16 scales the loss itself

    def __init__(self, module, optimizer, world: World, config=None, device=None):
        from services.trainer import devices

        self.module = module  # the unwrapped (PEFT or HF) model
        self.model = module  # what forward runs on
        self.optimizer = optimizer
        self.world = world
        self.config, self.device = config, device
        mixed = config is not None and device is not None and devices.mixed(config)
        self.autocasts = mixed and not self.own_mixed_precision
        self.scaler = devices.grad_scaler(config, device) if mixed and not self.own_loss_scaler else None

    def forward(self, **inputs):
        from services.trainer import devices

        if self.device is not None:
            inputs = devices.to_device(inputs, self.device)
        if not self.autocasts:
            return self.model(**inputs)
        with devices.autocast(self.config, self.device):
            return self.model(**inputs)

    def scaled(self, loss):
        """What backward runs on: the loss x world size (every back end averages gradients
        over ranks), x the float16 loss scale when there is one."""
        loss = loss * self.world.world_size
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def backward(self, loss, last: bool) -> None:
        self.scaled(loss).backward()

    def step(self, trainable: list, max_grad_norm: float) -> float:
        """Clips, steps the optimizer, clears gradients; returns the norm before clipping
        (float16: of the unscaled gradients; a step whose gradients overflowed is skipped
        by the scaler, which then lowers its scale)."""
        import torch

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm if max_grad_norm > 0 else math.inf)
        if hasattr(norm, "full_tensor"):  # DTensor (FSDP2)
            norm = norm.full_tensor()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def publishable(self):
        """What rank 0 publishes (its `save_pretrained` writes the model files); None elsewhere."""
        return self.module if self.world.is_main else None

    def optimizer_state(self) -> dict:
        """The whole optimizer state, for training_state.pt."""
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def save_shards(self, directory: pathlib.Path, step: int) -> None:
        """Collective (sharded back ends): every rank writes its own optimizer and parameter
        shards into `directory`, which every rank sees (a shared file system across nodes)."""
        raise NotImplementedError(f"{self.name} keeps its optimizer state in training_state.pt")

    def load_shards(self, checkpoint_dir: pathlib.Path) -> None:
        """Collective: every rank reads back its own shards of `save_shards`."""
        raise NotImplementedError(f"{self.name} keeps its optimizer state in training_state.pt")

    def write_model(self, directory: pathlib.Path | None) -> None:
        """Collective: rank 0 (given `directory`) writes the published model files there."""
        if directory is not None:
            self.module.save_pretrained(directory, **vocabulary.save_kwargs(self.module))


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, module, optimizer, world: World, config=None, device=None):
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(module, optimizer, world, config, device)
        # device_ids only for a module on one CUDA device (torch refuses them for a CPU module)
        cuda = device is not None and device.type == "cuda"
        self.model = DistributedDataParallel(module, device_ids=[device.index] if cuda else None)

    def backward(self, loss, last: bool) -> None:
        # gradients are all-reduced on the last micro-batch of the step only
        if last:
            self.scaled(loss).backward()
        else:
            with self.model.no_sync():
                self.scaled(loss).backward()


class FSDPEngine(Engine):
    """FSDP2: parameters sharded across ranks. `shard` shards the model in place before
    the optimizer is built over the sharded parameters; under a PEFT wrapper the sharded
    root is its base model and the PEFT model is what gets published."""

    name = "fsdp"
    own_mixed_precision = True  # shard(): MixedPrecisionPolicy
    sharded = True
    STATE = "fsdp_state"  # torch.distributed.checkpoint: .metadata and one __<rank>_0.distcp per rank
    SHARD_FILES = f"{STATE}/ (torch.distributed.checkpoint)"

    def __init__(self, module, optimizer, world: World, config=None, device=None):
        super().__init__(module, optimizer, world, config, device)
        self.root = module.get_base_model() if hasattr(module, "get_base_model") else module

    def backward(self, loss, last: bool) -> None:
        self.root.set_requires_gradient_sync(last)  # reduce-scatter on the last micro-batch only
        self.scaled(loss).backward()

    def _state_dicts(self) -> dict:
        """Every rank's own shards (DTensors) of the trainable parameters and of their AdamW
        state, keyed by parameter name: nothing is gathered. Frozen parameters (a LoRA base)
        are the published base model's and are not saved again."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model, optimizer = get_state_dict(self.module, self.optimizer,
                                          options=StateDictOptions(ignore_frozen_params=True))
        return {"model": model, "optimizer": optimizer}

    def save_shards(self, directory: pathlib.Path, step: int) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state_dicts(), checkpoint_id=directory / self.STATE)

    def load_shards(self, checkpoint_dir: pathlib.Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        from libs.common.errors import InvalidArgument

        if not (checkpoint_dir / self.STATE / ".metadata").is_file():
            raise InvalidArgument(f"{checkpoint_dir} holds no FSDP2 optimizer state ({self.SHARD_FILES}): it was not "
                                  "saved by an FSDP2 run; add --resume_only_model true", field="resume_from_checkpoint")
        state = self._state_dicts()  # the shapes and shardings to read into
        dcp.load(state, checkpoint_id=checkpoint_dir / self.STATE)  # fails naming any key the checkpoint lacks
        # not strict: the frozen parameters are not in it (they came from the published base)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))

    def write_model(self, directory: pathlib.Path | None) -> None:
        import torch
        from torch.distributed.tensor import DTensor

        from services.trainer import streamed_save

        main = self.world.is_main

        @torch.no_grad()
        def gather(tensor):  # collective for a sharded parameter: an all-gather of this one
            whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()
            return whole.cpu() if main else None

        streamed_save.write_model(directory, self.module, gather)


class DeepSpeedEngine(Engine):
    """DeepSpeed's engine around the module: its bf16/fp16 sections are the mixed precision
    (it casts the module itself and keeps float32 partitions; fp16 with its own loss scaler)."""

    name = "deepspeed"
    own_mixed_precision = own_loss_scaler = True
    sharded = True
    SHARD_FILES = "global_step<N>/ (DeepSpeed's checkpoint)"

    def __init__(self, module, optimizer, world: World, ds_config: dict[str, Any], config=None, device=None):
        import deepspeed

        super().__init__(module, optimizer, world, config, device)
        self.stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        self.model, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)

    def backward(self, loss, last: bool) -> None:
        self.model.set_gradient_accumulation_boundary(last)
        self.model.backward(loss * self.world.world_size, scale_wrt_gas=False)

    def step(self, trainable: list, max_grad_norm: float) -> float:
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def save_shards(self, directory: pathlib.Path, step: int) -> None:
        """DeepSpeed's own checkpoint, as the Hugging Face Trainer lays it out: global_step<N>/
        with every rank's optimizer partition (zero_pp_rank_<r>_mp_rank_00_optim_states.pt, its
        fp32 master partition included) and the module states (rank 0's
        mp_rank_00_model_states.pt; ZeRO-3: every rank's own partition), and `latest`.
        Frozen parameters (a LoRA base) are the published base model's and are left out."""
        self.model.save_checkpoint(str(directory), tag=f"global_step{step}", exclude_frozen_parameters=True)

    def load_shards(self, checkpoint_dir: pathlib.Path) -> None:
        from libs.common.errors import InvalidArgument

        tags = sorted(p.name for p in checkpoint_dir.glob("global_step*") if p.is_dir())
        if len(tags) != 1:
            raise InvalidArgument(f"{checkpoint_dir} holds no DeepSpeed checkpoint ({self.SHARD_FILES}): it was not "
                                  "saved by a DeepSpeed run; add --resume_only_model true", field="resume_from_checkpoint")
        # ZeRO-3 partitions the module states too: a checkpoint of the other kind has other files
        partitioned = bool(list((checkpoint_dir / tags[0]).glob("zero_pp_rank_*_model_states.pt")))
        if partitioned != (self.stage == 3):
            raise InvalidArgument(f"{checkpoint_dir} was trained with ZeRO stage {'3' if partitioned else '0-2'}; resume "
                                  f"it with the same --deepspeed configuration (this run has stage {self.stage})",
                                  field="resume_from_checkpoint")
        # the module's trainable weights, this rank's fp32 master partition and its AdamW state
        self.model.load_checkpoint(str(checkpoint_dir), tag=tags[0], load_module_strict=False,
                                   load_optimizer_states=True, load_lr_scheduler_states=False)

    def write_model(self, directory: pathlib.Path | None) -> None:
        """Streamed under every stage: save_pretrained's safetensors writer would first copy the
        whole model into one buffer (measured: +0.95x the model on rank 0 under ZeRO-2)."""
        from services.trainer import streamed_save

        if self.stage != 3:  # ZeRO-1/2: rank 0 holds the whole model itself, nothing to gather
            if directory is not None:
                streamed_save.write_model(directory, self.module, lambda tensor: tensor.detach().cpu())
            return
        import deepspeed

        main = self.world.is_main

        def gather(tensor):  # collective for a partitioned parameter: an all-gather of this one
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                return tensor.detach().to("cpu", copy=True) if main else None

        streamed_save.write_model(directory, self.module, gather)


def shard(model, config, world: World, trained: bool = True):
    """FSDP2 shards the model in place (each decoder layer, then the whole); call before
    building the optimizer. With --torch_dtype bfloat16/float16 the shards stay float32 (the
    master weights) and are gathered in torch_dtype for compute, gradients reduced in
    float32 (MixedPrecisionPolicy). Other back ends leave it alone. The root of a trained model
    keeps its parameters gathered from its forward to its backward (FSDP2's default); a frozen
    one (`trained` false) has no backward and gives them back after each forward."""
    if not (world.distributed and config.fsdp):
        return model
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from services.trainer import devices

    options = {}
    if devices.mixed(config):
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=devices.compute_dtype(config),
                                                    reduce_dtype=torch.float32)
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_classes = set(getattr(root, "_no_split_modules", None) or [])
    for module in root.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, **options)
    fully_shard(root, reshard_after_forward=None if trained else True, **options)
    return model


def reshard(model) -> None:
    """Gives back the parameters an FSDP2 root still holds gathered after forwards without a
    backward (eval): left so, the model's parameters are no longer the sharded ones its
    optimizer steps, and saving the optimizer state fails (KeyError in
    get_optimizer_state_dict). Nothing to do for the other back ends."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def frozen(model, config, world: World):
    """A frozen model that runs beside the trained one (the reference of dpo and kto in full
    training or with --ref_model), placed as the back end places the policy: FSDP2 shards it
    the same way (each decoder layer, then the whole; its forward all-gathers, as the
    policy's), ZeRO-3 partitions it with the job's DeepSpeed config (no optimizer; TRL's
    prepare_deepspeed). DDP and ZeRO-0/1/2 keep a whole copy on every rank, as TRL does (its
    forward needs no collective). Returns what to call forward on."""
    model.requires_grad_(False)
    model.eval()
    if not world.distributed:
        return model
    if config.fsdp:
        return shard(model, config, world, trained=False)
    if config.deepspeed:
        ds_config = resolved_deepspeed_config(config, world)
        if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
            import deepspeed

            engine, *_ = deepspeed.initialize(model=model, config=ds_config)
            engine.eval()
            return engine
    return model


def wrap(model, optimizer, config, world: World, device=None) -> Engine:
    """The engine for this job's back end on `device` (one process: no wrapping at all)."""
    if not world.distributed:
        return Engine(model, optimizer, world, config, device)
    if config.deepspeed:
        ds_config = resolved_deepspeed_config(config, world)
        return DeepSpeedEngine(model, optimizer, world, ds_config, config, device)
    if config.fsdp:
        return FSDPEngine(model, optimizer, world, config, device)
    return DDPEngine(model, optimizer, world, config, device)


def resolved_deepspeed_config(config, world: World) -> dict[str, Any]:
    """The --deepspeed config with every "auto" filled in from the job."""
    ds = deepspeed_json(config.deepspeed)
    auto = {
        "train_micro_batch_size_per_gpu": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "train_batch_size": config.per_device_train_batch_size * config.gradient_accumulation_steps * world.world_size,
        "gradient_clipping": config.max_grad_norm,
    }
    for key, value in auto.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    for section, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        if section not in ds and config.torch_dtype == dtype:  # a JSON without the section: --torch_dtype decides
            ds[section] = {"enabled": True}
        if isinstance(ds.get(section), dict) and ds[section].get("enabled") == "auto":
            ds[section]["enabled"] = config.torch_dtype == dtype
    zero = ds.get("zero_optimization", {})
    for key, value in list(zero.items()):
        if value == "auto":
            zero.pop(key)  # DeepSpeed's own default
    return ds
