"""Argument types shared by the command lines (``varcore ...``, ``sample_ddp``, the trainers): each refuses a bad
value with argparse's one-line usage error, before any model is loaded or file written."""
import argparse
import math
from pathlib import Path

__all__ = ["device_arg", "out_dir_arg", "image_path_arg", "npz_path_arg", "finite_float", "positive_float",
           "positive_int", "seed_arg"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def device_arg(text: str) -> str:
    """A torch device that can hold data here: ``cpu``, or ``cuda[:i]`` with a visible GPU i."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "meta":
        raise argparse.ArgumentTypeError("meta tensors hold no data: use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but no CUDA device is available (torch "
                                             f"{torch.__version__}, CUDA build: {torch.version.cuda}); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: varcore runs on cpu or cuda")
    return str(device)


def _parent_is_usable(path: Path) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{path}: {parent} is a file, not a folder")
            return


def out_dir_arg(text: str) -> str:
    """An output folder: missing (it is created) or a folder, never a file, under a path of folders."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    _parent_is_usable(path)
    return text


def _file_to_write(text: str, suffixes) -> str:
    """A file to write: one of ``suffixes``, not a folder, under a parent that is (or can become) a folder."""
    path = Path(text)
    if path.suffix.lower() not in suffixes:
        ends = suffixes[0] if len(suffixes) == 1 else f"one of {', '.join(suffixes)}"
        raise argparse.ArgumentTypeError(f"{text}: the name must end in {ends}")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder")
    _parent_is_usable(path)
    return text


def image_path_arg(text: str) -> str:
    """An image file to write (a known image extension)."""
    return _file_to_write(text, IMAGE_SUFFIXES)


def npz_path_arg(text: str) -> str:
    """An .npz file to write."""
    return _file_to_write(text, (".npz",))


def _int_in(text: str, low: int, high: float, rule: str) -> int:
    """``int(text)`` in [low, high), else argparse's error saying ``rule``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if not low <= value < high:
        raise argparse.ArgumentTypeError(f"{text!r}: {rule}")
    return value


def positive_int(text: str) -> int:
    """An int >= 1 (a count or a size)."""
    return _int_in(text, 1, math.inf, "an int >= 1 is needed")


def seed_arg(text: str) -> int:
    """A seed: an int in [0, 2**64)."""
    return _int_in(text, 0, 2 ** 64, "a seed is an int in [0, 2**64)")


def finite_float(text: str) -> float:
    """A float that is not NaN or infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: a finite number is needed")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0 (a divisor: temperatures, time limits)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a number > 0 is needed")
    return value
