"""Which turns of a conversation train, under ms-swift's `--loss_scale`:
default (every assistant turn), last_round (the assistant turns after the last
user turn), all (every token). A message's own `loss` wins; tool responses never train."""

from __future__ import annotations

LOSS_SCALES = ("default", "last_round", "all")


def trained_messages(roles: list[str], losses: list[bool | None], loss_scale: str) -> list[bool]:
    """trained[i]: whether message i's tokens carry labels. Under `all` the tokens
    between messages (a template's default system prompt, say) train as well."""
    if loss_scale not in LOSS_SCALES:
        raise ValueError(f"loss_scale: expected one of {', '.join(LOSS_SCALES)}; got {loss_scale!r}")
    last_user = max((i for i, role in enumerate(roles) if role == "user"), default=-1)
    trained = []
    for i, (role, loss) in enumerate(zip(roles, losses, strict=True)):
        if role == "tool":
            trained.append(False)
        elif loss is not None:
            trained.append(loss)
        elif loss_scale == "all":
            trained.append(True)
        elif loss_scale == "last_round":
            trained.append(role == "assistant" and i > last_user)
        else:
            trained.append(role == "assistant")
    return trained
