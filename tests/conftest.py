import os

import torch
from hypothesis import HealthCheck, settings

# A fast default for local runs; CI runs every law on at least 200 examples.
settings.register_profile("default", max_examples=30, deadline=None)
settings.register_profile(
    "ci", max_examples=200, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") == "true" else os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Tests never reach the Hugging Face Hub: a Hub id in a config is read from the cache only.
os.environ["HF_HUB_OFFLINE"] = "1"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

