"""Shared test configuration: small thread counts keep the suite fast on 2-core machines."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

torch.set_num_threads(1)
