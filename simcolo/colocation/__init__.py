"""The simulated backend of co-location: builds the layout a policy asks for (isolated, co-located
pipelines, finetuning on decode GPUs), wires training to serving on shared GPUs, and provides the views
and cost predictions policies decide with."""
