"""The tokenizer a job trains with (`--tokenizer`, else the model's) and the model's vocabulary
fitted to it: a larger vocabulary resizes the input embeddings and the output head before any
adapter is put on them. New rows are initialised as transformers' `resize_token_embeddings` does
by default (mean resizing: drawn around the old rows' mean with their covariance), so a new
token starts as an average old one rather than as noise."""

from __future__ import annotations

import pathlib

from libs.common.errors import FailedPrecondition, NotFound


def tokenizer_dir(tokenizer: str | None, model_dir: pathlib.Path) -> pathlib.Path:
    """Where the job's tokenizer is read from: `--tokenizer`, else the model's directory."""
    return pathlib.Path(tokenizer).expanduser().resolve() if tokenizer else pathlib.Path(model_dir)


def load(tokenizer: str | None, model_dir: pathlib.Path):
    """The job's tokenizer; one that cannot be loaded is an error naming its flag."""
    from transformers import AutoTokenizer

    where = tokenizer_dir(tokenizer, model_dir)
    if not where.is_dir():  # transformers would take a missing path for a hub name
        raise NotFound(f"{where}: no such directory", field="tokenizer" if tokenizer else "model")
    try:
        return AutoTokenizer.from_pretrained(str(where))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise FailedPrecondition(f"{where}: cannot load its tokenizer: {exc}",
                                 field="tokenizer" if tokenizer else "model") from None


def embedding_rows(model_dir: pathlib.Path) -> int:
    """The model's vocabulary size from its config.json (nothing loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    text = getattr(config, "get_text_config", lambda: config)()
    return int(text.vocab_size)


def fit(model, vocabulary: int) -> int | None:
    """Resizes `model`'s embeddings and head to `vocabulary` rows when it has fewer (a
    smaller tokenizer keeps the rows it has: checkpoints stay loadable by the base's
    code). Returns the old row count when resized, else None."""
    rows = model.get_input_embeddings().weight.shape[0]
    if vocabulary <= rows:
        return None
    model.resize_token_embeddings(vocabulary)  # mean_resizing=True: transformers' default
    return rows


def save_kwargs(module) -> dict:
    """What `save_pretrained` needs for `module`. PEFT (0.21) also writes the embedding layers
    beside an adapter whose base vocabulary was resized (save_embedding_layers "auto"), and
    when they are modules_to_save already it writes them under names it cannot load back.
    Ours always are (TrainConfig refuses a resize without them), so an adapter never does."""
    return {"save_embedding_layers": False} if hasattr(module, "peft_config") else {}
