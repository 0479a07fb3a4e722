"""What runs where: the layout plan (computed once from the config and the policy) and the cost predictor
it binds to the policy. Both backends build the same plan."""
