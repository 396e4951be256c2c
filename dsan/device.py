"""Choosing the device, and the process group under torchrun."""

from __future__ import annotations

import importlib
import os

import torch
import torch.distributed as dist

from .errors import RunError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def choose_device(option: str = "auto", local_rank: int = 0) -> torch.device:
    """auto: CUDA when available, else the CPU; cuda without a GPU is an error."""
    if option not in DEVICE_CHOICES:
        raise RunError(f"--device {option}: choose one of {', '.join(DEVICE_CHOICES)}")
    if option == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: CUDA is not available (no GPU visible, or torch is a CPU build)")
    if option == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device(f"cuda:{local_rank}")
    torch.cuda.set_device(device)
    return device


def world_size_from_environment() -> int:
    """Processes started by torchrun (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_distributed(device_option: str):
    """(rank, world size, device). Under torchrun: joins the process group (gloo on CPU, nccl on CUDA)."""
    device = choose_device(device_option, int(os.environ.get("LOCAL_RANK", "0")))
    if world_size_from_environment() > 1 and not dist.is_initialized():
        # torch._dynamo keeps references to a process group that exists when it is first imported
        # (by the optimizer or DDP): imported before the group exists, it holds none, so
        # destroy_process_group can free the gloo threads before the interpreter exits.
        importlib.import_module("torch._dynamo")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank_and_world() + (device,)


def rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
