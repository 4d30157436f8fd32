"""The load-test harness every scenario shares.

- ``client``: the minimal WebSocket client the load processes drive;
- ``stats``: latency histograms, percentiles, medians over runs;
- ``processes``: servers, load processes, CPU and RSS accounting, profiling,
  and the removal of what a benchmark leaves in Redis and Postgres;
- ``report``: tables, JSON, and the run driver that ends in them;
- ``cli``: argument types and the ``--quick`` timing shared by the scenarios.

The scenario modules (``loadtests.fanout``, ``loadtests.tips``,
``loadtests.bench``, ``loadtests.ledger_write``) keep only what load they
offer, what they measure and their baseline.
"""
