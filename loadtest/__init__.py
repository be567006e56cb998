"""``quickdraw loadtest``: a gRPC load generator that tells the truth about latency.

- ``engine``: closed loop (N callers) and open loop (constant or Poisson arrivals, latency measured from each
  call's *intended* send time, so a stalled server cannot hide its stall: coordinated omission corrected),
  unary or streaming, over one or several channels, against the gateway or TF Serving's PredictionService.
- ``sources``: requests built from real Quick, Draw! files, in any mix of input kinds.
- ``report``: HdrHistogram percentiles, throughput, errors by code, sweeps, a JSON report and PNG plots.
"""
