"""Safe loading of official VAR checkpoints and a small model zoo.

Files are read with ``torch.load(..., weights_only=True)`` or safetensors, never as a bare pickle. Accepted
layouts: a flat state dict (the released ``var_d*.pth`` and ``vae_ch160v4096z32.pth``), the official trainer
checkpoint ``{"trainer": {"var_wo_ddp": ..., "vae_local": ...}}`` (also written by ``varcore.train``), and
``{"model": ...}`` / ``{"state_dict": ...}`` wrappers; ``module.`` / ``_orig_mod.`` prefixes are removed.
Architectures are inferred from the tensors, so ``load_var("var_d30.pth", vae)`` needs no other arguments.

Model zoo: ``from_pretrained("var-d16")`` ... ``"var-d36"`` returns ``(vae, var)`` and ``from_pretrained("vae")``
the VQVAE; ``from_pretrained("code-8")`` returns CoDe's ``(vae, drafter, refiner)`` (see :func:`load_code_pair`);
``from_pretrained("llamagen-xl")`` (LlamaGen's 384 px class-conditional GPTs ``c2i_*_384.pt``) and
``"par-xl-4x"`` ... (PAR's ``PAR-*.pt``) return ``(vq, gpt)`` with LlamaGen's VQ-16 tokenizer (:data:`GPT_ZOO`).
Files are looked up in ``root`` or ``$VARCORE_HOME`` and otherwise downloaded from the Hugging Face repo
``FoundationVision/var`` (CoDe's pairs: ``Zigeng/VAR_CoDe``, LlamaGen's files: ``FoundationVision/LlamaGen``,
PAR's: ``Epiphqny/PAR``) when ``huggingface_hub`` is installed and the hub is reachable.
"""
import os
import re
import warnings
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from varcore.models import PATCH_NUMS, VAR, VAR_CONFIGS, VQVAE

__all__ = ["read_file", "read_state_dict", "nonfinite_entries", "load_state_dict_checked", "infer_vae_kwargs",
           "infer_var_kwargs", "load_vae",
           "load_var", "from_pretrained", "zoo_path", "ZOO_FILES", "HF_REPO",
           "load_code_pair", "CODE_HF_REPO", "GPT_ZOO", "VQ16_FILE"]

HF_REPO = "FoundationVision/var"
CODE_HF_REPO = "Zigeng/VAR_CoDe"  # CoDe's fine-tuned drafter_{N}.pth (VAR-d30) and refiner_{N}.pth (VAR-d16)
CODE_DRAFT_STEPS = (6, 7, 8, 9)
VAE_FILE = "vae_ch160v4096z32.pth"
VQ16_FILE = "vq_ds16_c2i.pt"  # LlamaGen's VQ-16 tokenizer, shared by LlamaGen's and PAR's class-conditional GPTs
# the released 384 px (24 x 24 token) class-conditional GPTs: name -> (file, Hugging Face repo)
GPT_ZOO = {**{f"llamagen-{size.lower()}": (f"c2i_{size}_384.pt", "FoundationVision/LlamaGen")
              for size in ("B", "L", "XL", "XXL", "3B")},
           **{f"par-{name.lower()}": (f"PAR-{name}.pt", "Epiphqny/PAR")
              for name in ("XL-4x", "XXL-4x", "3B-4x", "3B-16x")}}
ZOO_FILES = {"vae": VAE_FILE, **{f"var-{name}": f"var_{name}.pth" for name in VAR_CONFIGS},
             **{f"code-{role}-{n}": f"{role}_{n}.pth" for n in CODE_DRAFT_STEPS for role in ("drafter", "refiner")},
             "vq16": VQ16_FILE, **{name: file for name, (file, _) in GPT_ZOO.items()}}

PathLike = Union[str, os.PathLike]
_TRAINER_KEYS = {"var": "var_wo_ddp", "vae": "vae_local"}
_WRAPPER_KEYS = ("model", "state_dict")
_STRIP_PREFIXES = ("module.", "_orig_mod.")


def read_file(path: PathLike, map_location="cpu"):
    """A checkpoint file's contents: safetensors by extension, else ``torch.load(weights_only=True)``. Every
    failure is a ValueError naming the file and what is wrong with it: empty, truncated or not a checkpoint,
    not valid safetensors, or objects that only a full unpickler could build (which varcore never runs)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a directory, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device=str(map_location))
        except Exception as e:  # SafetensorError names neither the file nor always the cause
            raise ValueError(f"{path} is not a valid safetensors file ({type(e).__name__}: {e}); it may be "
                             f"truncated or damaged") from None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # the weights-only unpickler's refusal, or a stream or zip cut short
        if "Unsupported global" in str(e):
            raise ValueError(f"{path} holds objects that torch.load(weights_only=True) refuses to build; varcore "
                             f"does not unpickle arbitrary objects. Re-save it as a plain state dict or "
                             f"safetensors.") from None
        detail = next((line.strip() for line in str(e).splitlines() if "error:" in line), str(e)[:200])
        raise ValueError(f"{path} is truncated or not a checkpoint ({type(e).__name__}: {detail})") from None


def read_state_dict(source: Union[PathLike, Mapping], kind: str = "var") -> Dict[str, torch.Tensor]:
    """A flat state dict from a file or a loaded object, unwrapping the trainer layout (``kind`` 'var' or 'vae'
    selects ``var_wo_ddp`` or ``vae_local``) and ``model`` / ``state_dict`` wrappers."""
    if kind not in _TRAINER_KEYS:
        raise ValueError(f"kind must be 'var' or 'vae', got {kind!r}")
    obj = source if isinstance(source, Mapping) else read_file(source)
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint must hold a dict, got {type(obj).__name__}")
    if "trainer" in obj and isinstance(obj["trainer"], Mapping):
        trainer = obj["trainer"]
        if _TRAINER_KEYS[kind] not in trainer:
            raise ValueError(f"trainer checkpoint has no {_TRAINER_KEYS[kind]!r} entry (keys: {sorted(trainer)})")
        obj = trainer[_TRAINER_KEYS[kind]]
    # a state dict never holds a mapping, so a mapping under "model" / "state_dict" is a wrapper
    while wrapped := [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]:
        obj = obj[wrapped[0]]
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"not a state dict: entries {bad[:5]} are not tensors")
    state = dict(obj)
    for prefix in _STRIP_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str,
                            assign: bool = False) -> None:
    """``model.load_state_dict(state_dict, strict=True)``, but a mismatch raises a ValueError that lists the
    missing keys, unexpected keys and shape mismatches together."""
    if isinstance(model, VQVAE):
        state_dict = model.adapt_state_dict(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"{what} checkpoint does not match the model:\n  missing keys: {missing}\n"
                         f"  unexpected keys: {unexpected}\n  shape mismatches: {shapes}")
    params = {name for name, _ in model.named_parameters()}
    model.load_state_dict(_checked_values(state_dict, own, params, what), strict=True, assign=assign)


def nonfinite_entries(state_dict: Mapping[str, torch.Tensor], params: set) -> list:
    """Keys of ``state_dict`` with values no trained model holds: in a parameter (a key in ``params``) NaN or
    +-inf, in a buffer NaN or +inf (-inf is how an attention-mask buffer says "hidden")."""
    def bad(k, v):
        if not v.is_floating_point() or v.is_meta:  # meta tensors (shape checks, planning) hold no values
            return False
        return not bool(torch.isfinite(v).all() if k in params else (~(torch.isnan(v) | torch.isposinf(v))).all())
    return [k for k, v in state_dict.items() if bad(k, v)]


def _checked_values(state_dict: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], params: set,
                    what: str) -> Dict[str, torch.Tensor]:
    """``state_dict`` with floating tensors in the model's dtypes (a float16, bfloat16 or float64 file is
    converted, with a warning saying so); refuses integer tensors of another dtype and the values of
    :func:`nonfinite_entries`."""
    converted, out = {}, {}
    for k, v in state_dict.items():
        want = own[k].dtype
        if v.dtype != want:
            if not (v.is_floating_point() and want.is_floating_point):
                raise ValueError(f"{what} checkpoint: {k} is {v.dtype}, the model's is {want}")
            converted[str(v.dtype)] = converted.get(str(v.dtype), 0) + 1
            v = v.to(want)
        out[k] = v
    nonfinite = nonfinite_entries(out, params)
    if nonfinite:
        raise ValueError(f"{what} checkpoint holds NaN or inf in {len(nonfinite)} tensor(s): {nonfinite[:8]} "
                         f"(a diverged or damaged checkpoint); refusing to load it")
    if converted:
        counts = ", ".join(f"{n} {dtype}" for dtype, n in sorted(converted.items()))
        warnings.warn(f"{what} checkpoint: converted {counts} tensor(s) to the model's dtype", stacklevel=3)
    return out


def _block_indices(state: Mapping[str, torch.Tensor], pattern: str) -> list:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state for m in [rx.match(k)] if m})


def infer_vae_kwargs(state: Mapping[str, torch.Tensor]) -> Dict:
    """VQVAE constructor arguments read off a VAE state dict (vocabulary, widths, ``ch_mult``, phi sharing).

    The scale schedule cannot be read from the weights: ``v_patch_nums`` stays at the 256 px default unless the
    caller overrides it (the same released VAE serves 256 and 512 px).
    """
    try:
        V, Cvae = state["quantize.embedding.weight"].shape
        ch = state["encoder.conv_in.weight"].shape[0]
        levels = _block_indices(state, r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight")
        ch_mult = tuple(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
        ks = state["quant_conv.weight"].shape[-1]
    except KeyError as e:
        raise ValueError(f"not a VQVAE state dict: missing {e}") from None
    kwargs = dict(vocab_size=V, z_channels=Cvae, ch=ch, ch_mult=ch_mult, quant_conv_ks=ks)
    partially = _block_indices(state, r"quantize\.quant_resi\.qresi_ls\.(\d+)\.weight")
    non_shared = _block_indices(state, r"quantize\.quant_resi\.(\d+)\.weight")
    if partially:
        kwargs["share_quant_resi"] = len(partially)
    elif "quantize.quant_resi.qresi.weight" in state:
        kwargs["share_quant_resi"] = 1
    elif non_shared:
        kwargs.update(share_quant_resi=0, default_qresi_counts=len(non_shared))
    else:  # no phi weights: identity phis
        kwargs["quant_resi"] = 0.0
    return kwargs


def _patch_nums_from_levels(lvl_1L: torch.Tensor) -> Tuple[int, ...]:
    counts = torch.bincount(lvl_1L.reshape(-1).long()).tolist()
    pns = tuple(round(c ** 0.5) for c in counts)
    if any(pn * pn != c for pn, c in zip(pns, counts)):
        raise ValueError(f"lvl_1L does not describe square scales (tokens per scale {counts})")
    return pns


def infer_var_kwargs(state: Mapping[str, torch.Tensor]) -> Dict:
    """VAR constructor arguments read off a VAR state dict: depth, width, heads, classes, MLP ratio, shared AdaLN,
    L2-normalised attention and the scale schedule (from ``lvl_1L``, else from the number of positions)."""
    try:
        C = state["pos_start"].shape[-1]
        L = state["pos_1LC"].shape[1]
        num_classes = state["class_emb.weight"].shape[0] - 1
        mlp_hidden = state["blocks.0.ffn.fc1.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a VAR state dict: missing {e}") from None
    depth = len(_block_indices(state, r"blocks\.(\d+)\.attn\.mat_qkv\.weight"))
    attn_l2_norm = "blocks.0.attn.scale_mul_1H11" in state
    num_heads = state["blocks.0.attn.scale_mul_1H11"].shape[1] if attn_l2_norm else max(C // 64, 1)
    if "lvl_1L" in state and not state["lvl_1L"].is_meta:
        patch_nums = _patch_nums_from_levels(state["lvl_1L"])
    else:
        matches = [pns for pns in PATCH_NUMS.values() if sum(p * p for p in pns) == L]
        if not matches:
            raise ValueError(f"cannot infer patch_nums for L={L}; pass patch_nums=")
        patch_nums = matches[0]
    return dict(depth=depth, embed_dim=C, num_heads=num_heads, num_classes=num_classes, mlp_ratio=mlp_hidden / C,
                shared_aln="blocks.0.ada_gss" in state, attn_l2_norm=attn_l2_norm, patch_nums=patch_nums,
                drop_path_rate=0.1 * depth / 24, norm_eps=1e-6, cond_drop_rate=0.1)


def load_vae(path: Union[PathLike, Mapping], device: Union[str, torch.device] = "cpu", **overrides) -> VQVAE:
    """Load a VQVAE checkpoint; the architecture is inferred (see :func:`infer_vae_kwargs`) and ``overrides``
    (VQVAE constructor arguments, e.g. ``v_patch_nums=PATCH_NUMS[512]``) win. The result is in test mode."""
    state = read_state_dict(path, kind="vae")
    kwargs = infer_vae_kwargs(state)
    kwargs.update(overrides)
    kwargs.setdefault("test_mode", True)
    with torch.device("meta"):  # no random init: every tensor comes from the file
        vae = VQVAE(**kwargs)
    load_state_dict_checked(vae, state, "VQVAE", assign=True)
    vae = vae.to(device)
    if vae.test_mode:
        vae.eval().requires_grad_(False)
    return vae


def load_var(path: Union[PathLike, Mapping], vae: VQVAE, device: Optional[Union[str, torch.device]] = None,
             **overrides) -> VAR:
    """Load a VAR checkpoint on top of ``vae`` (whose ``v_patch_nums`` must match the checkpoint's schedule).

    Depth, width, heads, classes, shared AdaLN, L2 attention and patch schedule are inferred from the file;
    ``overrides`` (VAR constructor arguments) win. ``device`` defaults to the VAE's. Returned in eval mode.
    """
    if not isinstance(vae, VQVAE):
        raise TypeError(f"vae must be a VQVAE, got {type(vae).__name__}")
    state = read_state_dict(path, kind="var")
    kwargs = infer_var_kwargs(state)
    kwargs.update(overrides)
    if tuple(kwargs["patch_nums"]) != tuple(vae.quantize.v_patch_nums):
        raise ValueError(f"the checkpoint's patch_nums {tuple(kwargs['patch_nums'])} differ from the VAE's "
                         f"v_patch_nums {tuple(vae.quantize.v_patch_nums)}; load the VAE with "
                         f"v_patch_nums={tuple(kwargs['patch_nums'])}")
    with torch.device("meta"):
        var = VAR(vae, **kwargs)
    load_state_dict_checked(var, state, "VAR", assign=True)
    device = vae.quantize.embedding.weight.device if device is None else device
    return var.to(device).eval()


def zoo_path(name: str, root: Optional[PathLike] = None) -> Path:
    """Local path of the zoo file ``name`` ('vae', 'var-d16', ...), downloading it when needed and possible."""
    if name not in ZOO_FILES:
        raise ValueError(f"name must be one of {sorted(ZOO_FILES)}, got {name!r}")
    filename = ZOO_FILES[name]
    repo = (CODE_HF_REPO if name.startswith("code-") else GPT_ZOO[name][1] if name in GPT_ZOO
            else "FoundationVision/LlamaGen" if name == "vq16" else HF_REPO)
    root = root if root is not None else os.environ.get("VARCORE_HOME")
    if root is not None and (Path(root) / filename).is_file():
        return Path(root) / filename
    where = (f"put {filename} into {Path(root)}" if root is not None
             else f"put {filename} into a folder and pass root=<folder> or set VARCORE_HOME")
    hint = f"download it from https://huggingface.co/{repo}/resolve/main/{filename} and {where}"
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise FileNotFoundError(f"{filename} not found locally and huggingface_hub is not installed: {hint}") \
            from None
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename,
                                    local_dir=None if root is None else str(root)))
    except Exception as e:  # offline, hub unreachable, ...
        raise FileNotFoundError(f"{filename} not found locally and the download from {repo} failed "
                                f"({type(e).__name__}: {e}): {hint}") from e


def from_pretrained(name: str, root: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu"
                    ) -> Union[nn.Module, Tuple[nn.Module, ...]]:
    """A released model: ``"vae"`` gives the VQVAE; ``"var-d16"``, ``"var-d20"``, ``"var-d24"``, ``"var-d30"``
    (256 px) and ``"var-d36"`` (512 px) give ``(vae, var)`` with the VAE on the model's scale schedule;
    ``"code-6"`` ... ``"code-9"`` give CoDe's fine-tuned ``(vae, drafter, refiner)`` for N = 6..9; ``"vq16"``
    gives LlamaGen's VQ-16 tokenizer and the :data:`GPT_ZOO` names (``"llamagen-b"`` ... ``"par-3b-16x"``) give
    ``(vq, gpt)`` (24 x 24 tokens, 384 px)."""
    code = re.fullmatch(r"code-(\d+)", name)
    if code and int(code.group(1)) in CODE_DRAFT_STEPS:
        n = int(code.group(1))
        vae = load_vae(zoo_path("vae", root), device=device)
        return (vae, *load_code_pair(zoo_path(f"code-drafter-{n}", root), zoo_path(f"code-refiner-{n}", root),
                                     vae, device=device))
    if name not in ZOO_FILES or name.startswith("code-"):
        names = sorted(n for n in ZOO_FILES if not n.startswith("code-")) + [f"code-{n}" for n in CODE_DRAFT_STEPS]
        raise ValueError(f"name must be one of {names}, got {name!r}")
    if name == "vae":
        return load_vae(zoo_path("vae", root), device=device)
    if name == "vq16":
        return load_vq16(zoo_path("vq16", root), device=device)
    if name in GPT_ZOO:
        return load_vq16(zoo_path("vq16", root), device=device), load_gpt(zoo_path(name, root), device=device)
    config = VAR_CONFIGS[name[len("var-"):]]
    vae = load_vae(zoo_path("vae", root), device=device, v_patch_nums=config.patch_nums)
    var = load_var(zoo_path(name, root), vae, device=device)
    if (var.depth, var.patch_nums, var.blocks[0].shared_aln) != (config.depth, config.patch_nums, config.shared_aln):
        raise ValueError(f"{zoo_path(name, root)} does not hold the {name} architecture")
    return vae, var


def load_code_pair(drafter: Union[PathLike, Mapping], refiner: Union[PathLike, Mapping], vae: VQVAE,
                   device: Optional[Union[str, torch.device]] = None) -> Tuple[VAR, VAR]:
    """Load a CoDe drafter and refiner (files or state dicts) on the one VQVAE they share.

    The official fine-tuned pairs are ``drafter_{N}.pth`` (VAR-d30 shape) and ``refiner_{N}.pth`` (VAR-d16
    shape) for N = 6..9; training-free CoDe uses any two VAR checkpoints on the same VQVAE (``var_d30.pth`` +
    ``var_d16.pth``). Architectures are inferred from the files; a pair that cannot collaborate (different scale
    schedules or classes) is refused with a ValueError. Returns ``(drafter, refiner)`` in eval mode.
    """
    from varcore.models.code import check_code_pair  # deferred like the trainer's import of this module

    pair = load_var(drafter, vae, device=device), load_var(refiner, vae, device=device)
    check_code_pair(*pair)
    return pair


# ---------------------------------------------------------------------------------------------- LlamaGen / PAR
def gpt_state_dict(source: Union[PathLike, Mapping]) -> Dict[str, torch.Tensor]:
    """A flat GPT state dict from a raw file (FSDP export) or a ``model`` / ``module`` (DeepSpeed) /
    ``state_dict`` wrapper, as PAR's sampler accepts."""
    obj = source if isinstance(source, Mapping) else read_file(source)
    if isinstance(obj, Mapping) and isinstance(obj.get("module"), Mapping):
        obj = obj["module"]
    return read_state_dict(obj, kind="var")


def load_gpt(path: Union[PathLike, Mapping], block_size: int = 576, device: Union[str, torch.device] = "cpu",
             **overrides):
    """Load a LlamaGen ``c2i_*.pt`` or PAR ``PAR-*.pt`` checkpoint into a :class:`varcore.models.gpt.Transformer`.

    Width, depth, vocabulary, classes and the number of transition tokens (0 for LlamaGen, M*M - 1 for PAR) are
    read off the tensors, the head count from the named configs (GPT-B ... GPT-7B). The grid cannot be read from
    the weights: ``block_size`` is 576 (24 x 24 tokens, the 384 px models) unless given (256 for ``*_256.pt``).
    ``overrides`` (ModelArgs fields) win. Returned in eval mode.
    """
    from varcore.models.gpt import GPT_CONFIGS, ModelArgs, Transformer

    state = gpt_state_dict(path)
    try:
        vocab_size, dim = state["tok_embeddings.weight"].shape
        num_classes = state["cls_embedding.embedding_table.weight"].shape[0] - 1
    except KeyError as e:
        raise ValueError(f"not a LlamaGen/PAR GPT state dict: missing {e}") from None
    n_layer = len(_block_indices(state, r"layers\.(\d+)\.attention\.wqkv\.weight"))
    spe = state["spe_tok_embeddings.special_embeddings.weight"].shape[0] \
        if "spe_tok_embeddings.special_embeddings.weight" in state else 0
    heads = [h for (layers, h, d) in GPT_CONFIGS.values() if (layers, d) == (n_layer, dim)]
    if not heads and "n_head" not in overrides:
        raise ValueError(f"no named GPT config has {n_layer} layers of width {dim}; pass n_head=")
    kwargs = dict(dim=dim, n_layer=n_layer, n_head=heads[0] if heads else None, vocab_size=vocab_size,
                  num_classes=num_classes, block_size=block_size, spe_token_num=spe, ar_token_num=spe + 1)
    kwargs.update(overrides)
    with torch.device("meta"):
        model = Transformer(ModelArgs(**kwargs))
    load_state_dict_checked(model, state, "GPT", assign=True)
    return model.to(device).eval()


def load_vq16(path: Union[PathLike, Mapping], device: Union[str, torch.device] = "cpu", **overrides):
    """Load LlamaGen's ``vq_ds16_c2i.pt`` (weights under ``model``) into a VQ-16 :class:`varcore.models.vq16.VQModel`;
    codebook size and dimension are read off the file, ``overrides`` (ModelArgs fields) win. Eval mode, frozen."""
    from varcore.models.vq16 import ModelArgs as VQArgs, VQModel

    state = gpt_state_dict(path)
    if "quantize.embedding.weight" not in state:
        raise ValueError("not a LlamaGen VQ state dict: missing 'quantize.embedding.weight'")
    n_e, e_dim = state["quantize.embedding.weight"].shape
    kwargs = dict(codebook_size=n_e, codebook_embed_dim=e_dim, codebook_show_usage="quantize.codebook_used" in state)
    kwargs.update(overrides)
    with torch.device("meta"):
        vq = VQModel(VQArgs(**kwargs))
    load_state_dict_checked(vq, state, "VQ-16", assign=True)
    return vq.to(device).eval().requires_grad_(False)


__all__ += ["load_gpt", "load_vq16"]
