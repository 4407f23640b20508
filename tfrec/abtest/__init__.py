"""Online experiments end to end: simulated shoppers against the real server, and the
A/B report (per-arm business metrics, decision, off-policy check) of the run."""

from tfrec.abtest.report import abtest_report
from tfrec.abtest.simulate import run_abtest, served_events

__all__ = ["abtest_report", "run_abtest", "served_events"]
