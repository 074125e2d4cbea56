"""Follows a trainer's checkpoint publications (TrainerService.WatchCheckpoints)
and hot-loads the ones its promotion policy lets into live traffic under their adapter
name, replacing the older checkpoint of that name; reconnects with backoff while the
trainer is away. No restart needed.

The policy (--follow_policy, per adapter pattern with --follow_jobs): `final` promotes
a job's last checkpoint only, `best` each checkpoint whose eval loss beats every earlier
one of its job, `all` every one. A burst of promoted publications (the replay on
connect, or a fast trainer) collapses to the newest per adapter name: older ones would
be replaced at once. A live publication's delivery (its publish_time to the load's start) is
observed with the load's other parts (services.serving.metrics.ADAPTER_LOAD_PARTS).
A checkpoint vLLM cannot serve as a LoRA (modules_to_save, a resized vocabulary) is not
loaded; why, and the commands that serve its merged export, show in ListAdapters and in the
answer to requests naming it.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time

import grpc

from libs.common import channels, logs
from libs.common.errors import TuneForgeError
from protos.tuneforge.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.serving.adapters import AdapterRegistry, Unservable

LOG = logging.getLogger("tuneforge.serving.follow")


class FollowPolicy:
    """Decides which published checkpoints go live. `rules` are (pattern, policy or None)
    over adapter names, the first match deciding (None: `default`); with rules, an adapter
    no pattern matches is not followed. Remembers each job's best eval loss for `best`."""

    def __init__(self, default: str = "final", rules: list[tuple[str, str | None]] | None = None):
        self.default = default
        self.rules = list(rules or [])
        self._best: dict[str, float] = {}  # job id -> lowest eval loss promoted

    def policy_of(self, adapter_name: str) -> str | None:
        if not self.rules:
            return self.default
        for pattern, policy in self.rules:
            if fnmatch.fnmatchcase(adapter_name, pattern):
                return policy or self.default
        return None

    def promotes(self, event: trainer_pb2.CheckpointEvent) -> tuple[bool, str]:
        """(whether the checkpoint goes live, why)."""
        policy = self.policy_of(event.adapter_name)
        if policy is None:
            return False, "no --follow_jobs pattern matches its adapter name"
        if policy == "all":
            return True, "follow_policy all"
        if policy == "final":
            return (True, "the job's final checkpoint") if event.final else (False, "not the job's final checkpoint")
        if not event.HasField("eval_loss"):
            return False, "no eval loss at its step (follow_policy best)"
        best = self._best.get(event.job_id)
        if best is not None and not event.eval_loss < best:
            return False, f"eval loss {event.eval_loss:.6g} does not beat the job's best {best:.6g}"
        self._best[event.job_id] = event.eval_loss
        return True, f"the job's best eval loss so far ({event.eval_loss:.6g})"


class CheckpointFollower:
    def __init__(self, address: str, registry: AdapterRegistry, policy: FollowPolicy | None = None,
                 initial_backoff: float = 0.5, max_backoff: float = 10.0, connect_timeout: float = 5.0):
        self.address = address
        self.registry = registry
        self.policy = policy or FollowPolicy()
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        # adapter name -> (newest event not loaded yet, monotonic time it arrived, whether it is live)
        self._pending: dict[str, tuple[trainer_pb2.CheckpointEvent, float, bool]] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._watch(), name="follow-watch"),
                       asyncio.create_task(self._load(), name="follow-load")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _watch(self) -> None:
        backoff = self.initial_backoff
        while True:
            try:
                async with channels.open_aio_channel(self.address) as channel:
                    # A stream's first bytes come with its first checkpoint, which may be long
                    # after connecting; the channel tells when the trainer is reachable.
                    await asyncio.wait_for(channel.channel_ready(), self.connect_timeout)
                    logs.log(LOG, logging.INFO, "following trainer checkpoints", trainer=self.address)
                    backoff = self.initial_backoff
                    connected = time.time()
                    # Replay on every (re)connect: publications made while we were away are caught up;
                    # checkpoints already served are skipped by the registry (load if_changed).
                    call = trainer_pb2_grpc.TrainerServiceStub(channel).WatchCheckpoints(
                        trainer_pb2.WatchCheckpointsRequest(only_new=False))
                    async for response in call:
                        self._offer(response.checkpoint, connected)
                logs.log(LOG, logging.WARNING, "trainer ended the checkpoint stream; reconnecting",
                         trainer=self.address)
            except asyncio.TimeoutError:
                logs.log(LOG, logging.WARNING, "trainer unreachable; retrying", trainer=self.address,
                         waited=self.connect_timeout, retry_in=backoff)
            except grpc.aio.AioRpcError as exc:
                logs.log(LOG, logging.WARNING, "trainer unavailable; retrying", trainer=self.address,
                         code=exc.code().name, details=exc.details(), retry_in=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    def _offer(self, event: trainer_pb2.CheckpointEvent, connected: float) -> None:
        if not event.adapter_name:
            # the trainer names only what vLLM can serve as a LoRA: not a whole model, not a reward model
            logs.log(LOG, logging.INFO, "checkpoint without an adapter name (a full model or a reward model); "
                     "not loaded", path=event.path, job=event.job_id, step=event.step)
            return
        promoted, why = self.policy.promotes(event)
        if not promoted:
            logs.log(LOG, logging.INFO, "published checkpoint not promoted", adapter=event.adapter_name,
                     path=event.path, job=event.job_id, step=event.step, reason=why)
            return
        self._pending.pop(event.adapter_name, None)  # re-insert: dict order is arrival order
        # Live: published while we were connected. A replayed one was published while we were
        # away; its wait says how long serving was away, not how fast events arrive.
        live = event.HasField("publish_time") and event.publish_time.ToNanoseconds() / 1e9 >= connected
        self._pending[event.adapter_name] = (event, time.monotonic(), live)
        self._wake.set()

    async def _load(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                name = next(iter(self._pending))
                event, arrived, live = self._pending.pop(name)
                try:
                    view = await self.registry.load(
                        name, event.path, if_changed=True,
                        published_at=event.publish_time.ToNanoseconds() / 1e9 if live else None)
                except Unservable as exc:
                    # Not a LoRA vLLM can apply; serving it merged needs a model of its own (one engine
                    # serves one base model), so say so where on-call and users look: ListAdapters,
                    # requests naming it, tuneforge_serving_adapter_refusals_total{reason}.
                    await self.registry.refused(name, event.path, exc.message)
                    logs.log(LOG, logging.ERROR, "published checkpoint cannot be served as a LoRA", adapter=name,
                             path=event.path, step=event.step, reason=exc.reason, error=exc.message)
                    continue
                except TuneForgeError as exc:
                    logs.log(LOG, logging.WARNING, "published checkpoint not loaded", adapter=name,
                             path=event.path, step=event.step, error=str(exc))
                    continue
                except Exception:  # a bug must not stop following: log it and take the next checkpoint
                    LOG.exception("loading a published checkpoint failed: adapter %s, path %s", name, event.path)
                    continue
                logs.log(LOG, logging.INFO, "published checkpoint serving", adapter=name, path=view.path,
                         step=event.step, final=event.final,
                         seconds_since_event=round(time.monotonic() - arrived, 4),
                         load_seconds=round(view.load_seconds, 4))
