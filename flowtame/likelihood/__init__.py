"""Exact likelihood passes (NLL in nats and BPD), statistics, base-vs-tamed evaluation, protocol sets."""
