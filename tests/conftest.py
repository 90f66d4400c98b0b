"""Test-wide settings."""

import torch

# The tests use tiny tensors: one intra-op thread avoids thread start-up and spin-wait costs
# that dominate at these sizes (and that explode when the machine is shared).
torch.set_num_threads(1)
