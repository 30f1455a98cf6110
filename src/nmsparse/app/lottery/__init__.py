"""Lottery-ticket sanity checks: iterative magnitude pruning with rewinding against its
controls (see :mod:`nmsparse.app.lottery.harness` and :mod:`nmsparse.app.lottery.verdict`)."""

from .harness import ARMS, TicketSetting, imp_patterns, run_setting
from .verdict import ArmStats, Verdict, judge, verdict_table

__all__ = ["ARMS", "ArmStats", "TicketSetting", "Verdict", "imp_patterns", "judge",
           "run_setting", "verdict_table"]
