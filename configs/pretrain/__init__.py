"""The pre-training configs (``prune pretrain``): the root config and its groups, a search path of
their own so that they never mix with the training groups of the same names."""
