"""Which torch device a process runs its models on."""
import torch


def resolve_device(name: str = "auto") -> str:
    """`auto` picks the best accelerator present at run time; anything else is taken as given."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"
