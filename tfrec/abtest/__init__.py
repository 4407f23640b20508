"""Online experiments end to end: simulated shoppers against the real server
(`tfrec.abtest.simulate.run_abtest`), and the A/B report of the run (per-arm business
metrics, decision, off-policy check: `tfrec.abtest.report.abtest_report`).

Nothing is imported here, so `tfrec --help` and the CLI's parser stay free of TensorFlow.
"""
