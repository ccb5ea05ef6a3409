"""One seed for every random number generator a stage draws from."""

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def reseed_rank(seed: int, rank: int) -> None:
    """Give rank `rank` > 0 of a job seeded `seed` a torch random stream of its own (dropout must
    differ between ranks; rank 0 keeps the one-process stream). Call once the model is built:
    every rank builds the same initial weights first."""
    if rank:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))
