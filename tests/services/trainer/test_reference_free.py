"""ORPO, CPO and SimPO (services.trainer.methods.orpo / cpo / simpo): each method's loss, its
gradients and its logged metrics equal TRL 1.16's ORPOTrainer / CPOTrainer computing its loss on
its own collated batch of the same pairs with the same model (fp32 CPU, 1e-5); where ms-swift
differs from TRL (ORPO's NLL, SimPO's defaults) it is held to the written formula; packed pairs
equal unpacked; the method's bad combinations are refused at SubmitJob, every problem at once."""

from __future__ import annotations

import json
import math
import pathlib
from typing import NamedTuple

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from libs.dataset.schema import IGNORE_INDEX
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from services.trainer import data, methods, pairs
from services.trainer.config import CpoConfig, OrpoConfig, SimpoConfig, TrainConfig, to_arguments
from services.trainer.losses.orpo import log1mexp

TOLERANCE = 1e-5
# Answers of different lengths, so that summing and averaging log-probs disagree.
PAIRS = [("What is 2 plus 2?", "It is 4.", "I do not know."),
         ("Name a colour.", "Blue, like the sky on a clear summer day.", "No."),
         ("Say hello.", "Hello!", "I would rather not say anything at all, sorry."),
         ("What is the capital of France?", "Paris is the capital of France.", "Berlin.")]


# -- pure losses -----------------------------------------------------------------------------------------

def test_log1mexp_is_exact_where_either_naive_form_cancels():
    x = torch.tensor([-1e-9, -1e-4, -0.5, -math.log(2), -0.9, -5.0, -40.0, -80.0], dtype=torch.float64)
    # float64, each side with the form that has no cancellation there (to ~1e-15 relative)
    expected = [math.log(-math.expm1(v)) if v > -1 else math.log1p(-math.exp(v)) for v in x.tolist()]
    got = log1mexp(x.float()).double()
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    # the naive form loses everything at both ends in float32
    naive = torch.log(1 - torch.exp(x.float()))
    assert not torch.isfinite(naive[0]) and naive[-2] == 0.0


# -- equal to TRL on the same model and pairs --------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Tiny(NamedTuple):
    tokenizer: object
    model: torch.nn.Module  # the default model in fp32, shared by TRL's trainers and our methods
    scratch: pathlib.Path  # TRL's output_dir (it writes nothing there here)


@pytest.fixture(scope="module")
def tiny(default_model, tmp_path_factory) -> Tiny:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32)
    model.eval()  # no dropout on either side (TRL's disable_dropout does the same)
    return Tiny(AutoTokenizer.from_pretrained(default_model), model, tmp_path_factory.mktemp("trl"))


def trl_trainer(kind: str, tiny: Tiny, **arguments):
    """TRL's own trainer over PAIRS (conversational, so TRL applies the chat template and tokenizes)."""
    from datasets import Dataset

    if kind == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for q, c, r in PAIRS]
    args = Config(output_dir=str(tiny.scratch), report_to=[], use_cpu=True, max_length=512,
                  per_device_train_batch_size=len(PAIRS), remove_unused_columns=False, **arguments)
    return Trainer(model=tiny.model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny.tokenizer)


@pytest.fixture(scope="module")
def rows(tiny: Tiny) -> list[data.PairRow]:
    return pair_rows(trl_trainer("cpo", tiny))


def trl_batch(trainer) -> dict:
    """TRL's collated batch of every pair (its DPODataCollatorWithPadding)."""
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])


def pair_rows(trainer) -> list[data.PairRow]:
    """The same pairs as our trainer reads them: TRL's token ids and labels, one PairRow each."""
    def side(example, name):
        return data.Row(np.array(example[f"{name}_input_ids"], dtype=np.int32),
                        np.array(example[f"{name}_labels"], dtype=np.int32))

    return [data.PairRow(side(e, "chosen"), side(e, "rejected")) for e in trainer.train_dataset]


def packed_rows(rows: list[data.PairRow], groups: list[list[int]]) -> list[data.Row]:
    """The pairs packed as dataprep packs preference data: each pair's chosen then rejected sample."""
    packed = []
    for group in groups:
        samples = [s for i in group for s in (rows[i].chosen, rows[i].rejected)]
        packed.append(data.Row(np.concatenate([s.input_ids for s in samples]),
                               np.concatenate([s.labels for s in samples]),
                               seq_lens=np.array([len(s.input_ids) for s in samples], dtype=np.int32),
                               margins=np.full(len(group), np.nan)))
    return packed


def our_method(rlhf_type: str, tiny: Tiny, **arguments):
    fields = {"orpo": ("orpo", OrpoConfig), "cpo": ("cpo", CpoConfig), "simpo": ("simpo", SimpoConfig)}
    name, cls = fields[rlhf_type]
    config = TrainConfig(rlhf_type=rlhf_type, **{name: cls(**arguments)})
    return methods.get(rlhf_type)(config, tiny.model, tiny.model, tiny.tokenizer)


def our_step(method, micro_batches: list[data.MicroBatch]) -> tuple[float, dict[str, float], list[torch.Tensor]]:
    """One step as the engine runs it (services.trainer.training.train_step, one rank): the
    micro-batches' losses and metrics summed, each normalised by the step's counts."""
    model = method.forward
    model.zero_grad(set_to_none=True)
    step: dict[str, int] = {}
    for micro in micro_batches:
        for name, value in method.counts(micro).items():
            step[name] = step.get(name, 0) + value
    loss_value, metrics = 0.0, dict.fromkeys(method.metrics, 0.0)
    for micro in micro_batches:
        loss, logged = method.loss(micro, step)
        loss.backward()
        loss_value += loss.item()
        assert set(logged) == set(method.metrics)
        for name, value in logged.items():
            metrics[name] += float(value)
    return loss_value, metrics, gradients(model)


def gradients(model) -> list[torch.Tensor]:
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def trl_step(trainer, batch: dict, adjust=None) -> tuple[float, dict[str, float], list[torch.Tensor]]:
    """TRL's compute_loss on its batch: loss, the metrics it stores, the gradients (of the loss
    plus `adjust(model)`, where ms-swift's loss differs from TRL's by a term)."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    trainer._stored_metrics.clear()
    loss = trainer.compute_loss(model, batch)
    if adjust is not None:
        loss = loss + adjust(model)
    loss.backward()
    stored = {name: values[-1] for name, values in trainer._stored_metrics["train"].items()}
    return loss.item(), stored, gradients(model)


def assert_equal(ours, theirs, metric_names):
    (loss, metrics, grads), (trl_loss, trl_metrics, trl_grads) = ours, theirs
    assert abs(loss - trl_loss) < TOLERANCE, (loss, trl_loss)
    for name in metric_names:
        assert abs(metrics[name] - trl_metrics[name]) < TOLERANCE, (name, metrics[name], trl_metrics[name])
    worst = max(float((a - b).abs().max()) for a, b in zip(grads, trl_grads))
    assert worst < TOLERANCE, worst
    assert max(float(g.abs().max()) for g in grads) > 1e-3  # the gradients compared are not all ~0


def chosen_cross_entropy(model, batch: dict, labels: torch.Tensor) -> torch.Tensor:
    """The written NLL: cross-entropy mean over the chosen rows' `labels` (causal shift)."""
    logits = model(batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def test_orpo_equals_trl_with_ms_swift_nll_over_the_chosen_answer(tiny):
    """TRL's ORPO takes its NLL over the chosen prompt and answer; ms-swift's (and ours) over the
    chosen answer's tokens only (ms-swift passes the labels through as TRL's NLL input). The
    odds-ratio term, its gradients and every other metric are TRL's."""
    trainer = trl_trainer("orpo", tiny, beta=0.25)
    batch = trl_batch(trainer)
    model = tiny.model
    everything = torch.where(batch["chosen_attention_mask"] == 1, batch["chosen_input_ids"], IGNORE_INDEX)
    with torch.no_grad():
        trl_nll = chosen_cross_entropy(model, batch, everything).item()
        answer_nll = chosen_cross_entropy(model, batch, batch["chosen_labels"]).item()

    # TRL's loss with its prompt-and-answer NLL swapped for the answer's: ms-swift's ORPO
    theirs = trl_step(trainer, batch, adjust=lambda m: chosen_cross_entropy(m, batch, batch["chosen_labels"])
                      - chosen_cross_entropy(m, batch, everything))
    assert abs(theirs[1]["nll_loss"] - trl_nll) < TOLERANCE  # what TRL's NLL is, spelled out
    assert abs(trl_nll - answer_nll) > 0.1  # and it is not the answer's

    method = our_method("orpo", tiny, beta=0.25)
    ours = our_step(method, [method.collate(pair_rows(trainer), pad_id=0)])
    assert_equal(ours, theirs, [n for n in method.metrics if n != "nll_loss"])
    assert abs(ours[1]["nll_loss"] - answer_nll) < TOLERANCE
    assert set(method.metrics) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                                   "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"}


@pytest.mark.parametrize("loss_type, extra", [("sigmoid", dict(label_smoothing=0.2)), ("hinge", {}), ("ipo", {}),
                                              ("simpo", dict(simpo_gamma=0.7, label_smoothing=0.1))])
def test_cpo_equals_trl(tiny, loss_type, extra):
    arguments = dict(beta=0.3, loss_type=loss_type, cpo_alpha=0.5, **extra)
    trainer = trl_trainer("cpo", tiny, **arguments)
    theirs = trl_step(trainer, trl_batch(trainer))
    method = our_method("cpo", tiny, **arguments)
    ours = our_step(method, [method.collate(pair_rows(trainer), pad_id=0)])
    assert_equal(ours, theirs, method.metrics)


def test_simpo_with_ms_swift_defaults_equals_trl_cpo_simpo_and_the_written_formula(tiny):
    """ms-swift runs SimPO as TRL's CPO with loss_type simpo, beta 2.0, simpo_gamma 1.0 (TRL's
    default is 0.5) and cpo_alpha 1.0 (the chosen NLL of CPO-SimPO); cpo_alpha 0 is the paper's
    pure SimPO: -log sigmoid(beta/|y_w| log p(y_w|x) - beta/|y_l| log p(y_l|x) - gamma)."""
    from trl.experimental.cpo import CPOConfig

    defaults = SimpoConfig()
    assert (defaults.beta, defaults.simpo_gamma, defaults.cpo_alpha, defaults.label_smoothing) == (2.0, 1.0, 1.0, 0.0)
    assert CPOConfig(output_dir=str(tiny.scratch), use_cpu=True).simpo_gamma == 0.5  # TRL's, which we do not follow

    trainer = trl_trainer("cpo", tiny, loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=1.0)
    batch = trl_batch(trainer)
    theirs = trl_step(trainer, batch)
    method = our_method("simpo", tiny)
    rows = pair_rows(trainer)
    ours = our_step(method, [method.collate(rows, pad_id=0)])
    assert_equal(ours, theirs, method.metrics)

    # the written formula, one sequence at a time, for pure SimPO and CPO-SimPO
    model = tiny.model
    with torch.no_grad():
        def mean_logp(row: data.Row) -> tuple[float, float, int]:
            ids = torch.from_numpy(row.input_ids.astype(np.int64))[None]
            logps = torch.log_softmax(model(ids).logits[0].double(), -1)
            picked = [float(logps[t, row.labels[t + 1]]) for t in range(len(row.labels) - 1)
                      if row.labels[t + 1] != IGNORE_INDEX]
            return sum(picked) / len(picked), sum(picked), len(picked)

        sides = [(mean_logp(p.chosen), mean_logp(p.rejected)) for p in rows]
    simpo = [-F.logsigmoid(torch.tensor(2.0 * c[0] - 2.0 * r[0] - 1.0, dtype=torch.float64)).item() for c, r in sides]
    nll = -sum(c[1] for c, _ in sides) / sum(c[2] for c, _ in sides)
    assert abs(ours[0] - (sum(simpo) / len(simpo) + nll)) < TOLERANCE
    pure = our_method("simpo", tiny, cpo_alpha=0.0)
    assert abs(our_step(pure, [pure.collate(rows, pad_id=0)])[0] - sum(simpo) / len(simpo)) < TOLERANCE


@pytest.mark.parametrize("rlhf_type, arguments", [("orpo", {}), ("simpo", dict(label_smoothing=0.1)),
                                                  ("cpo", dict(loss_type="hinge"))])
def test_packed_pairs_in_two_micro_batches_equal_unpacked_in_one(tiny, rows, rlhf_type, arguments):
    """Loss, gradients and metrics: packing and how a step's pairs split into micro-batches leave
    them unchanged (pairs and chosen tokens counted over the whole step)."""
    method = our_method(rlhf_type, tiny, **arguments)
    unpacked = our_step(method, [method.collate(rows, pad_id=0)])
    packed_micro = [method.collate([row], pad_id=0) for row in packed_rows(rows, [[0, 1, 2], [3]])]
    assert packed_micro[0].position_ids is not None  # really packed: block-diagonal mask, restarting positions
    packed = our_step(method, packed_micro)
    assert_equal(packed, unpacked, method.metrics)


def test_chosen_tokens_counts_what_the_nll_divides_by(rows):
    expected = sum(int((row.chosen.labels[1:] != IGNORE_INDEX).sum()) for row in rows)
    assert pairs.chosen_tokens(pairs.collate(rows, pad_id=0)) == expected
    assert sum(pairs.chosen_tokens(pairs.collate([row], pad_id=0))
               for row in packed_rows(rows, [[0, 1], [2, 3]])) == expected


# -- learning, end to end ---------------------------------------------------------------------------------

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "How many legs does a spider have?",
             "What is 3 times 3?", "Which planet is largest?", "What do bees make?", "What is frozen water called?",
             "How many days are in a week?"]
ANSWERS = ["Paris.", "Red.", "Eight.", "Nine.", "Jupiter.", "Honey.", "Ice.", "Seven."]


def answer_logp(model, tokenizer, question: str, answer: str) -> float:
    """Mean log-prob per token of `answer` after `question`, through the chat template."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    full = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}])
    prompt, full = list(getattr(prompt, "input_ids", prompt)), list(getattr(full, "input_ids", full))
    assert full[:len(prompt)] == prompt
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([full])).logits[0, :-1].float(), -1)
    targets = torch.tensor(full[1:])
    return float(logps.gather(-1, targets[:, None])[len(prompt) - 1:].mean())


@pytest.mark.slow
def test_orpo_on_packed_pairs_learns_through_tuneforge_rlhf(trainer, dataprep_address, default_model, tiny,
                                                            tmp_path, capsys):
    """`tuneforge rlhf --rlhf_type orpo --packing true`: every step logs ORPO's metrics (loss =
    nll_loss - beta x log_odds_ratio), and the published LoRA adapter puts a larger chosen-minus-
    rejected margin (mean log-prob per answer token) on every training pair than the base model does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cli.main import main as tuneforge

    raw = tmp_path / "pairs.jsonl"
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                    {"role": "assistant", "content": a}],
                                       "rejected_response": "I do not know."}) + "\n"
                           for q, a in zip(QUESTIONS, ANSWERS)))
    run = tmp_path / "run"
    code = tuneforge(["rlhf", "--rlhf_type", "orpo", "--dataset", str(raw), "--output_dir", str(run),
                      "--packing", "true", "--max_length", "256", "--max_steps", "12", "--learning_rate", "3e-3",
                      "--lr_scheduler_type", "constant", "--lora_rank", "16",
                      "--trainer_address", trainer.address, "--dataprep_address", dataprep_address])
    _out, err = capsys.readouterr()
    assert code == 0, err
    logged = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == list(range(1, 13))
    for entry in logged:
        assert set(methods.get("orpo").metrics) <= set(entry)
        assert entry["loss"] == pytest.approx(entry["nll_loss"] - 0.1 * entry["log_odds_ratio"], abs=1e-5)
    # three packed rows, shuffled each epoch: the pair accuracy of the first epoch against the fourth
    # (measured: 0.0 then 0.89)
    accuracy = [entry["rewards/accuracies"] for entry in logged]
    assert sum(accuracy[:3]) / 3 < 0.5 and sum(accuracy[-3:]) / 3 > 0.8, accuracy

    tokenizer = tiny.tokenizer
    base = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()
    before = [answer_logp(base, tokenizer, q, a) - answer_logp(base, tokenizer, q, "I do not know.")
              for q, a in zip(QUESTIONS, ANSWERS)]
    tuned = PeftModel.from_pretrained(base, str(run / "checkpoint-12")).eval()
    after = [answer_logp(tuned, tokenizer, q, a) - answer_logp(tuned, tokenizer, q, "I do not know.")
             for q, a in zip(QUESTIONS, ANSWERS)]
    # measured (12 steps, rows shuffled per epoch): base -4.3 .. -1.0, tuned +1.2 .. +3.9: the chosen
    # answer now wins on every pair
    assert all(a > b and a > 0 for a, b in zip(after, before)), list(zip(before, after))


# -- refused at submission -------------------------------------------------------------------------------

def test_bad_reference_free_jobs_list_every_problem_at_once(stub, tmp_path, default_model):
    cases = [
        (dict(rlhf_type="simpo", ref_model=str(default_model), simpo=SimpoConfig(beta=0.0, label_smoothing=0.5)),
         ["ref_model: rlhf_type simpo has no reference model", "simpo.beta: must be positive; got 0.0",
          "simpo.label_smoothing: must be in [0, 0.5); got 0.5"]),
        (dict(rlhf_type="orpo", ref_adapters=[str(tmp_path)], precompute_ref_log_probs=True,
              orpo=OrpoConfig(beta=-1.0)),
         ["ref_adapters: rlhf_type orpo has no reference model", "precompute_ref_log_probs: rlhf_type orpo has no",
          "orpo.beta: must be positive; got -1.0"]),
        (dict(rlhf_type="cpo", ref_model=str(default_model), cpo=CpoConfig(loss_type="robust", cpo_alpha=-1.0),
              simpo=SimpoConfig()),
         ["ref_model: rlhf_type cpo has no reference model",
          "cpo.loss_type: expected one of sigmoid, hinge, ipo, simpo; got 'robust'",
          "cpo.cpo_alpha: must not be negative; got -1.0",
          "simpo: arguments of rlhf_type simpo, but rlhf_type is cpo"]),
    ]
    for i, (fields, expected) in enumerate(cases):
        out = tmp_path / f"run{i}"
        arguments = to_arguments(TrainConfig(dataset=str(tmp_path / "pairs"), dataprep_address="127.0.0.1:1",
                                             output_dir=str(out), **fields))
        with pytest.raises(grpc.RpcError) as caught:
            stub.SubmitJob(pb.SubmitJobRequest(arguments=arguments), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for problem in expected:
            assert problem in caught.value.details(), (problem, caught.value.details())
        assert not out.exists()  # no work started
