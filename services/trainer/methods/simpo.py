"""SimPO (--rlhf_type simpo), as ms-swift runs it: CPO with loss type simpo (methods.cpo), with
SimPO's own flags and defaults (config.SimpoConfig: beta 2.0, simpo_gamma 1.0, cpo_alpha 1.0,
which adds the chosen NLL as CPO-SimPO does; cpo_alpha 0 is the paper's pure SimPO)."""

from __future__ import annotations

from typing import ClassVar

from services.trainer.config import METHOD_KINDS
from services.trainer.methods.cpo import Cpo


class Simpo(Cpo):
    name: ClassVar[str] = "simpo"
    kinds, needs = METHOD_KINDS["simpo"]
    fixed_loss_type: ClassVar[str | None] = "simpo"


METHOD = Simpo
