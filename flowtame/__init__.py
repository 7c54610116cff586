"""flowtame: tame pretrained normalizing flows (forget or rebalance chosen images) and prove what changed."""

__version__ = "0.1.0"
