"""What every training loop here shares: how progress is shown, and dropout off."""
import sys

import torch


def on_terminal() -> bool:
    """Progress bars on a terminal; plain log lines when output goes to a file or a pipe."""
    return sys.stderr.isatty()


def disable_dropout(model: torch.nn.Module) -> None:
    """N-details "disable dropout": PPO's ratios and KL, and a reward pair's two scores, must
    compare the very function that produced them."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
