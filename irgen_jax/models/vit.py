"""The CLIP visual tower as a Vision Transformer, and the loader of CLIP checkpoints.

Layout (OpenAI CLIP ``VisionTransformer``, Hugging Face ``CLIPVisionModel``): a patch convolution
without bias, a class token, a learned position embedding over ``1 + P`` positions, ``ln_pre``, then
``depth`` pre-LayerNorm residual blocks (fused qkv self-attention; MLP ``width -> mlp_dim -> width``
with quick-GELU), and optionally ``ln_post`` and a bias-free projection.

Contract of :class:`ViT`:
- input: float32 images ``[B, H, W, C]`` (NHWC, C = 3 for CLIP weights), already normalized (CLIP
  mean/std), with ``(H, W) == image_size``;
- output: every token ``[B, 1 + P, width]`` in the compute ``dtype``, ``P = (H/p) * (W/p)`` in
  row-major patch order, token 0 the class token (the paper's f_cls). By default the output is taken
  BEFORE ``ln_post``, as the paper's code uses the tower (``ln_post`` and ``proj`` removed), which is
  also what Hugging Face returns as ``last_hidden_state``. With ``ln_post=True`` (and ``proj_dim``)
  every token gets the final LayerNorm (and projection): token 0 is then CLIP's image embedding.

Parameters are float32 whatever ``dtype`` is; ``dtype`` is the compute dtype (bfloat16 on
accelerators). LayerNorms and the attention softmax always run in float32 (the residual stream is
carried in ``dtype``, as CLIP's own fp16 mode does). Parity with torch is tested on CPU at 1e-4; on
GPU/TPU float32 matmuls use reduced-precision passes by default (TF32 / bfloat16), so expect ~1e-3
unless ``jax_default_matmul_precision`` is ``'highest'``. The parameter tree::

  patch_embed/kernel [p, p, C, D]   class_embedding [D]   pos_embedding [1+P, D]   ln_pre/{scale,bias}
  block_{i}/ln_1, attn/qkv/{kernel [D, 3D], bias [3D]}, attn/out, ln_2, mlp/fc1, mlp/fc2
  ln_post/{scale,bias} (ln_post=True)   proj/kernel [D, E] (proj_dim=E)

The fused qkv kernel holds q, k, v in that order along its output axis (OpenAI's ``in_proj_weight``
order); Hugging Face's separate q/k/v projections are concatenated into it on load.

Loading (big_vision's ``load`` pattern): :func:`load_clip` builds the module from a checkpoint and
returns ``(module, params)``; :func:`clip_config` gives the module's keyword arguments; :func:`load`
fills an existing parameter tree (e.g. the ``encoder`` subtree of a larger model) from a checkpoint,
resampling the position embedding to the tree's grid and keeping ``dont_load`` entries. Both layouts
are read: a Hugging Face directory (``config.json`` + ``model.safetensors`` / sharded safetensors /
``pytorch_model.bin``; ``CLIPVisionModel``, ``CLIPVisionModelWithProjection`` or ``CLIPModel``) and an
OpenAI checkpoint file (TorchScript archive, a ``torch.save``'d state dict, or safetensors with
``visual.*`` names). torch is imported only to read torch files.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import warnings
import zipfile
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# width, depth, heads of the ViT sizes (Dosovitskiy et al.; CLIP's B and L have the same shapes).
# MLP width is 4 x width throughout.
VARIANTS: dict[str, dict[str, int]] = {
    "Ti": dict(width=192, depth=12, num_heads=3),
    "S": dict(width=384, depth=12, num_heads=6),
    "B": dict(width=768, depth=12, num_heads=12),
    "L": dict(width=1024, depth=24, num_heads=16),
    "H": dict(width=1280, depth=32, num_heads=16),
}


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's GELU approximation ``x * sigmoid(1.702 x)``; the OpenAI weights were trained with it."""
  return x * jax.nn.sigmoid(1.702 * x)


# Names follow Hugging Face's ``hidden_act`` where they coincide. "gelu" is the exact erf GELU (torch's
# nn.GELU and HF's "gelu"); jax.nn.gelu defaults to the tanh form, which would not match those weights.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}
_HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
            "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, int):
    return (size, size)
  h, w = size
  return (int(h), int(w))


def _layer_norm(x: jax.Array, name: str, eps: float) -> jax.Array:
  # float32 statistics and output whatever the compute dtype: bfloat16 means/variances over 768+
  # channels lose enough precision to shift features; callers cast the result back.
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, name=name)(
      x.astype(jnp.float32))


def _dense(features: int, dtype: Any, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.xavier_uniform(), name=name)


class Attention(nn.Module):
  """Multi-head self-attention with one fused qkv projection. ``[B, N, D] -> [B, N, D]`` in ``dtype``."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    head_dim = d // self.num_heads
    qkv = _dense(3 * d, self.dtype, "qkv")(x).reshape(b, n, 3, self.num_heads, head_dim)
    # Heads-major [3, B, H, N, Dh] once, so both attention products are batched matmuls over (B, H)
    # of contiguous [N, Dh] operands. Contracting the [B, N, H, Dh] layout directly cost XLA's CPU
    # backend strided copies in every product: ViT-B/16 at 224, batch 16, ran 188 ms per image
    # against 155 ms this way, timed in turn in one process (same numbers up to float rounding);
    # benchmarks/beam_search.py --parts latency sets it beside PyTorch's CLIP tower.
    qkv = qkv.transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]                          # each [B, H, N, Dh]
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    # Logits accumulate and the softmax runs in float32 (a bfloat16 softmax over 197+ keys is coarse).
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
    return _dense(d, self.dtype, "out")(out.transpose(0, 2, 1, 3).reshape(b, n, d))


class Mlp(nn.Module):
  """``[..., D] -> [..., mlp_dim] -> act -> [..., D]`` in ``dtype``."""
  mlp_dim: int
  act: str = "quick_gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = ACTIVATIONS[self.act](_dense(self.mlp_dim, self.dtype, "fc1")(x))
    return _dense(x.shape[-1], self.dtype, "fc2")(y)


class Block(nn.Module):
  """Pre-LayerNorm residual block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``. Shape-preserving."""
  num_heads: int
  mlp_dim: int
  act: str = "quick_gelu"
  ln_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = _layer_norm(x, "ln_1", self.ln_eps).astype(self.dtype)
    x = x + Attention(self.num_heads, self.dtype, name="attn")(y)
    y = _layer_norm(x, "ln_2", self.ln_eps).astype(self.dtype)
    return x + Mlp(self.mlp_dim, self.act, self.dtype, name="mlp")(y)


# Same parameters and names as Block; activations inside are recomputed in the backward pass.
_RematBlock = nn.remat(Block)


class ViT(nn.Module):
  """CLIP-layout ViT: float32 images ``[B, H, W, C]`` -> tokens ``[B, 1 + P, width]`` in ``dtype``.

  Attributes:
    width, depth, num_heads, patch_size: the transformer's size (``width % num_heads == 0``).
    image_size: ``H`` (= ``W``) or ``(H, W)``, multiples of ``patch_size``; fixes ``P`` and the shape
      of ``pos_embedding`` (load at another size to resample it, see :func:`load_clip`).
    mlp_dim: hidden width of the MLP; default ``4 * width``.
    act: ``quick_gelu`` (CLIP), ``gelu`` (exact) or ``gelu_tanh``.
    ln_eps: LayerNorm epsilon (1e-5 in CLIP).
    ln_post: apply the final LayerNorm to every token (off: the paper's tokens).
    proj_dim: if set, a bias-free projection ``width -> proj_dim`` after ``ln_post`` (CLIP's ``proj``).
    dtype: compute dtype; parameters stay float32.
    remat: ``jax.checkpoint`` each block (recompute its activations in the backward pass: less memory
      for large batches, ~1/3 more compute).
  """
  width: int
  depth: int
  num_heads: int
  patch_size: int
  image_size: int | tuple[int, int] = 224
  mlp_dim: int | None = None
  act: str = "quick_gelu"
  ln_eps: float = 1e-5
  ln_post: bool = False
  proj_dim: int | None = None
  dtype: Any = jnp.float32
  remat: bool = False

  @property
  def grid(self) -> tuple[int, int]:
    """Patch grid ``(H / p, W / p)``."""
    h, w = _pair(self.image_size)
    return (h // self.patch_size, w // self.patch_size)

  @property
  def num_tokens(self) -> int:
    gh, gw = self.grid
    return 1 + gh * gw

  def _check(self, images: jax.Array) -> None:
    h, w = _pair(self.image_size)
    if self.width % self.num_heads:
      raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}.")
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}.")
    if self.act not in ACTIVATIONS:
      raise ValueError(f"act={self.act!r}: expected one of {sorted(ACTIVATIONS)}.")
    if images.ndim != 4 or tuple(images.shape[1:3]) != (h, w):
      raise ValueError(f"images have shape {tuple(images.shape)}: expected [B, {h}, {w}, C] (NHWC) "
                       f"for image_size={self.image_size}.")

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    # ``train`` is part of the encoder contract every model relies on; CLIP's tower has no dropout or
    # batch statistics, so it changes nothing here.
    del train
    self._check(images)
    d = self.width
    x = nn.Conv(d, (self.patch_size, self.patch_size), strides=(self.patch_size, self.patch_size),
                padding="VALID", use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=nn.initializers.lecun_normal(), name="patch_embed")(images)
    b = x.shape[0]
    x = x.reshape(b, -1, d)                                   # row-major over the patch grid
    # CLIP initializes both embeddings with std width**-0.5.
    init = nn.initializers.normal(stddev=d ** -0.5)
    cls = self.param("class_embedding", init, (d,), jnp.float32)
    pos = self.param("pos_embedding", init, (self.num_tokens, d), jnp.float32)
    # The embedding sum and ln_pre stay in float32: they are cheap and set the scale of everything after.
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x.astype(jnp.float32)], axis=1) + pos
    x = _layer_norm(x, "ln_pre", self.ln_eps).astype(self.dtype)

    block = _RematBlock if self.remat else Block
    mlp_dim = self.mlp_dim or 4 * d
    for i in range(self.depth):
      x = block(self.num_heads, mlp_dim, self.act, self.ln_eps, self.dtype, name=f"block_{i}")(x)

    if self.ln_post:
      x = _layer_norm(x, "ln_post", self.ln_eps).astype(self.dtype)
    if self.proj_dim:
      x = _dense(self.proj_dim, self.dtype, "proj", use_bias=False)(x)
    return x


def decode_variant(variant: str) -> dict[str, int]:
  """``'B/16'`` -> ``dict(width=768, depth=12, num_heads=12, patch_size=16)``."""
  m = re.fullmatch(r"([A-Za-z]+)/(\d+)", variant)
  if not m or m.group(1) not in VARIANTS:
    raise ValueError(f"variant={variant!r}: expected '<size>/<patch>' with size in {list(VARIANTS)}, "
                     "e.g. 'B/16'.")
  return {**VARIANTS[m.group(1)], "patch_size": int(m.group(2))}


def Model(variant: str | None = None, **kw: Any) -> ViT:  # noqa: N802 (big_vision's factory name)
  """A :class:`ViT` from a variant name (``'B/16'``) and/or explicit sizes; ``kw`` overrides the table.

  ``Model('B/16')``, ``Model('S/16', image_size=64, dtype=jnp.bfloat16)``,
  ``Model(width=64, depth=2, num_heads=4, patch_size=8, image_size=32)``.
  """
  return ViT(**{**(decode_variant(variant) if variant else {}), **kw})


# ---------------------------------------------------------------------------------------------------
# Position-embedding resampling


def _cubic_weight(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  # Keys' cubic convolution kernel with a = -0.75, the value torch's bicubic uses (jax.image.resize
  # uses a = -0.5): the resampled table then equals what torch-trained code (HF's
  # interpolate_pos_encoding, OpenCLIP's resize_pos_embed) would produce.
  t = np.abs(t)
  near = ((a + 2) * t - (a + 3)) * t * t + 1
  far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
  return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def _resize_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
  """``[n_out, n_in]`` weights of a 1-D resize with half-pixel centres (``align_corners=False``).

  Same sampling as ``torch.nn.functional.interpolate(..., align_corners=False, antialias=False)``:
  source coordinate ``(o + 0.5) * n_in / n_out - 0.5``, border samples clamped.
  """
  w = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for o in range(n_out):
    src = (o + 0.5) * scale - 0.5
    if method == "bilinear":
      src = max(src, 0.0)
      i0 = int(math.floor(src))
      frac = src - i0
      w[o, i0] += 1.0 - frac
      w[o, min(i0 + 1, n_in - 1)] += frac
    elif method == "bicubic":
      i0 = int(math.floor(src))
      frac = src - i0
      for k in range(-1, 3):
        w[o, min(max(i0 + k, 0), n_in - 1)] += _cubic_weight(np.float64(k - frac))
    else:
      raise ValueError(f"method={method!r}: expected 'bilinear' or 'bicubic'.")
  return w


def resample_posemb(posemb: np.ndarray, new_grid: int | Sequence[int], *,
                    old_grid: int | Sequence[int] | None = None, method: str = "bicubic") -> np.ndarray:
  """Resizes a position table ``[1 + gh*gw, D]`` to ``[1 + new_h*new_w, D]`` (float32 numpy).

  The class position (row 0) is kept as is; the patch positions are interpolated on their 2-D grid
  (``old_grid`` defaults to the square one). Equal grids return an unchanged copy.
  """
  posemb = np.asarray(posemb, np.float32)
  if posemb.ndim != 2:
    raise ValueError(f"posemb has shape {posemb.shape}: expected [1 + P, D].")
  n, d = posemb.shape[0] - 1, posemb.shape[1]
  if old_grid is None:
    side = int(round(math.sqrt(n)))
    if side * side != n:
      raise ValueError(f"posemb has {n} patch positions, not a square grid: pass old_grid=(h, w).")
    old_grid = (side, side)
  oh, ow = _pair(old_grid)
  nh, nw = _pair(new_grid)
  if oh * ow != n:
    raise ValueError(f"old_grid={old_grid} does not hold the {n} patch positions of posemb.")
  if (oh, ow) == (nh, nw):
    return posemb.copy()
  grid = posemb[1:].reshape(oh, ow, d).astype(np.float64)
  grid = np.einsum("ih,jw,hwd->ijd", _resize_matrix(oh, nh, method), _resize_matrix(ow, nw, method),
                   grid)
  return np.concatenate([posemb[:1], grid.reshape(nh * nw, d).astype(np.float32)], axis=0)


# ---------------------------------------------------------------------------------------------------
# Checkpoint reading


class CheckpointError(ValueError):
  """A checkpoint that cannot be read into this ViT; the message names the tensor and the expectation."""


class _Checkpoint:
  """The vision-tower tensors of one checkpoint (float32 numpy) and the ViT size they imply."""

  def __init__(self, source: str, layout: str, prefix: str, tensors: dict[str, np.ndarray],
               config: dict[str, Any], proj_dim: int | None):
    self.source = source        # file or directory, for messages
    self.layout = layout        # "hf" or "openai"
    self.prefix = prefix        # prefix of the vision tensors' names ("vision_model.", "visual.", "")
    self.tensors = tensors      # full tensor names -> float32 arrays
    self.config = config        # ViT keyword arguments
    self.proj_dim = proj_dim    # width of the checkpoint's image projection, None without one
    self.used: set[str] = set()

  def take(self, name: str, shape: Sequence[int | None], meaning: str, *, top: bool = False) -> np.ndarray:
    """The tensor ``prefix + name`` (``name`` if ``top``), checked against ``shape`` (None: any)."""
    full = name if top else self.prefix + name
    if full not in self.tensors:
      raise CheckpointError(
          f"{self.source}: missing tensor {full!r} (expected shape {_fmt(shape)} = {meaning}).")
    t = self.tensors[full]
    if t.ndim != len(shape) or any(s is not None and s != ts for s, ts in zip(shape, t.shape)):
      raise CheckpointError(
          f"{self.source}: tensor {full!r} has shape {tuple(t.shape)}; expected {_fmt(shape)} = {meaning}"
          + (f" (model size from the checkpoint: {_size_str(self.config)})." if self.config else "."))
    self.used.add(full)
    return t


def _fmt(shape: Sequence[int | None]) -> str:
  return "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"


def _size_str(cfg: Mapping[str, Any]) -> str:
  keys = ("width", "depth", "num_heads", "patch_size", "image_size", "mlp_dim")
  return ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


def _to_f32(x: Any) -> np.ndarray:
  return np.asarray(x).astype(np.float32)


def _read_safetensors(files: Sequence[str], keep: Callable[[str], bool]) -> dict[str, np.ndarray]:
  from safetensors import safe_open
  out = {}
  for f in files:
    # Key by key: a full CLIPModel file also holds the text tower, which is never read.
    with safe_open(f, framework="np") as st:
      for k in st.keys():
        if keep(k):
          out[k] = _to_f32(st.get_tensor(k))
  return out


def _read_torch(path: str) -> dict[str, np.ndarray]:
  """A TorchScript archive's or a ``torch.save``'d file's state dict as float32 numpy arrays."""
  try:
    import torch
  except ImportError as e:  # torch is a test/reading dependency, not a runtime one
    raise ImportError(f"Reading {path} needs torch (pip install torch, CPU build is enough).") from e
  is_script = False
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as z:
      # TorchScript archives carry compiled code and constants; plain torch.save zips do not.
      is_script = any(n.endswith("/constants.pkl") for n in z.namelist())
  try:
    if is_script:
      with warnings.catch_warnings():   # torch >= 2.9 deprecates TorchScript; OpenAI ships it
        warnings.simplefilter("ignore", DeprecationWarning)
        sd = torch.jit.load(path, map_location="cpu").state_dict()
    else:
      # weights_only: a checkpoint must not be able to run code on load.
      sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises RuntimeError, KeyError, UnpicklingError... on foreign files
    raise CheckpointError(f"{path}: not a TorchScript archive or a PyTorch state dict ({e}).") from e
  if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):   # OpenCLIP-style wrapper
    sd = sd["state_dict"]
  if not isinstance(sd, Mapping):
    raise CheckpointError(f"{path}: holds a {type(sd).__name__}, expected a state dict of tensors.")
  if sd and all(k.startswith("module.") for k in sd):                         # saved from DDP
    sd = {k[len("module."):]: v for k, v in sd.items()}
  return {k: v.detach().to(torch.float32).cpu().numpy() for k, v in sd.items()
          if isinstance(v, torch.Tensor)}


def _hf_weight_files(directory: str) -> tuple[str, list[str]]:
  """("safetensors" | "torch", files) of a Hugging Face model directory."""
  single = os.path.join(directory, "model.safetensors")
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(single):
    return "safetensors", [single]
  if os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    return "safetensors", [os.path.join(directory, s) for s in shards]
  torch_file = os.path.join(directory, "pytorch_model.bin")
  if os.path.exists(torch_file):
    return "torch", [torch_file]
  raise CheckpointError(f"{directory}: no model.safetensors, model.safetensors.index.json or "
                        "pytorch_model.bin next to config.json.")


# CLIPVisionConfig's defaults: older config.json files store only values that differ from them.
_HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def _read_hf(directory: str, act: str | None, num_heads: int | None) -> _Checkpoint:
  with open(os.path.join(directory, "config.json")) as f:
    cfg = json.load(f)
  if isinstance(cfg.get("vision_config"), Mapping):          # CLIPModel: take the vision tower
    vc = cfg["vision_config"]
  elif cfg.get("model_type", "clip_vision_model") == "clip_vision_model":
    vc = cfg
  else:
    raise CheckpointError(f"{directory}/config.json: model_type={cfg.get('model_type')!r} has no "
                          "vision_config; expected a CLIPVisionModel or CLIPModel config (unknown layout).")
  vc = {**_HF_DEFAULTS, **vc}
  kind, files = _hf_weight_files(directory)

  def keep(k: str) -> bool:
    return (k.startswith(("vision_model.", "embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm."))
            or k == "visual_projection.weight")

  if kind == "safetensors":
    tensors = _read_safetensors(files, keep)
  else:
    tensors = {k: v for k, v in _read_torch(files[0]).items() if keep(k)}
  # transformers 4.x saves every vision tower under "vision_model."; 5.x saves a bare
  # CLIPVisionModel without it.
  if "vision_model.embeddings.patch_embedding.weight" in tensors:
    prefix = "vision_model."
  elif "embeddings.patch_embedding.weight" in tensors:
    prefix = ""
  else:
    raise CheckpointError(
        f"{directory}: missing tensor 'vision_model.embeddings.patch_embedding.weight' (or "
        f"'embeddings.patch_embedding.weight'): not a CLIP vision checkpoint. First tensors: "
        f"{sorted(tensors)[:5]}.")
  hf_act = vc["hidden_act"]
  if act is None and hf_act not in _HF_ACTS:
    raise CheckpointError(f"{directory}/config.json: hidden_act={hf_act!r} is not supported; "
                          f"expected one of {sorted(_HF_ACTS)}.")
  config = dict(width=int(vc["hidden_size"]), depth=int(vc["num_hidden_layers"]),
                num_heads=int(num_heads or vc["num_attention_heads"]), patch_size=int(vc["patch_size"]),
                image_size=int(vc["image_size"]), mlp_dim=int(vc["intermediate_size"]),
                act=act or _HF_ACTS[hf_act], ln_eps=float(vc["layer_norm_eps"]))
  proj = tensors.get("visual_projection.weight")
  return _Checkpoint(directory, "hf", prefix, tensors, config,
                     None if proj is None else int(proj.shape[0]))


def _read_openai(path: str, act: str | None, num_heads: int | None) -> _Checkpoint:
  if path.endswith(".safetensors"):
    tensors = _read_safetensors([path], lambda k: True)
  else:
    tensors = _read_torch(path)
  if "visual.conv1.weight" in tensors:
    prefix = "visual."
  elif "conv1.weight" in tensors and "positional_embedding" in tensors:   # a visual-only state dict
    prefix = ""
  elif any(k.startswith(("visual.layer1.", "layer1.")) for k in tensors):
    raise CheckpointError(f"{path}: a CLIP modified-ResNet visual tower ('visual.layer1.*'), not a ViT.")
  elif any(k.endswith("embeddings.patch_embedding.weight") for k in tensors):
    raise CheckpointError(f"{path}: Hugging Face tensor names; pass the model directory (with its "
                          "config.json) instead of the weights file.")
  else:
    raise CheckpointError(
        f"{path}: unknown layout: no tensor 'visual.conv1.weight' (OpenAI CLIP) and no config.json "
        f"(Hugging Face directory). First tensors: {sorted(tensors)[:5]}.")
  ck = _Checkpoint(path, "openai", prefix, tensors, {}, None)
  conv = ck.take("conv1.weight", (None, None, None, None), "[width, 3, patch, patch]")
  width, patch = int(conv.shape[0]), int(conv.shape[-1])
  pos = ck.take("positional_embedding", (None, width), "[1 + grid**2, width]")
  grid = int(round(math.sqrt(pos.shape[0] - 1)))
  if grid * grid != pos.shape[0] - 1:
    raise CheckpointError(f"{path}: tensor {prefix + 'positional_embedding'!r} has {pos.shape[0]} rows; "
                          "expected 1 + a square number of patch positions.")
  blocks = {int(m.group(1)) for k in tensors
            if (m := re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", k))}
  depth = len(blocks)
  if blocks != set(range(depth)) or not depth:
    raise CheckpointError(f"{path}: residual blocks {sorted(blocks)} under "
                          f"{prefix + 'transformer.resblocks.'!r}; expected 0..depth-1.")
  fc = ck.take("transformer.resblocks.0.mlp.c_fc.weight", (None, width), "[mlp_dim, width]")
  if num_heads is None and width % 64 == 0:
    # The head count is not stored: OpenAI's build_model rule is 64-wide heads. Other towers (e.g.
    # OpenCLIP's H/14, 80-wide heads) need num_heads; None here fails only when a module is built.
    num_heads = width // 64
  ck.config = dict(width=width, depth=depth, num_heads=num_heads, patch_size=patch,
                   image_size=grid * patch, mlp_dim=int(fc.shape[0]), act=act or "quick_gelu",
                   ln_eps=1e-5)
  if prefix + "proj" in tensors:
    ck.proj_dim = int(tensors[prefix + "proj"].shape[-1])
  ck.used.clear()
  return ck


def _read(path: str | os.PathLike, act: str | None = None, num_heads: int | None = None) -> _Checkpoint:
  path = os.fspath(path)
  if act is not None and act not in ACTIVATIONS:
    raise ValueError(f"act={act!r}: expected one of {sorted(ACTIVATIONS)}.")
  if os.path.isdir(path):
    if not os.path.exists(os.path.join(path, "config.json")):
      raise CheckpointError(f"{path}: a directory without config.json (unknown layout); expected a "
                            "Hugging Face CLIP directory or an OpenAI checkpoint file.")
    return _read_hf(path, act, num_heads)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such CLIP checkpoint file or directory.")
  return _read_openai(path, act, num_heads)


def _convert(ck: _Checkpoint) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Our flat params ``{'block_0/attn/qkv/kernel': array}`` and, per entry, its source tensor(s)."""
  c = ck.config
  d, m, p = c["width"], c["mlp_dim"], c["patch_size"]
  n_pos = (c["image_size"] // p) ** 2 + 1
  flat: dict[str, np.ndarray] = {}
  src: dict[str, str] = {}

  def put(ours, value, *names):
    flat[ours] = np.ascontiguousarray(value, np.float32)
    src[ours] = ", ".join(repr(ck.prefix + n) for n in names)

  def ln(ours, name):
    put(f"{ours}/scale", ck.take(f"{name}.weight", (d,), "[width]"), f"{name}.weight")
    put(f"{ours}/bias", ck.take(f"{name}.bias", (d,), "[width]"), f"{name}.bias")

  def linear(ours, name, n_out, n_in, out_name, in_name):
    # torch Linear weights are [out, in]; flax kernels [in, out].
    w = ck.take(f"{name}.weight", (n_out, n_in), f"[{out_name}, {in_name}]")
    put(f"{ours}/kernel", w.T, f"{name}.weight")
    put(f"{ours}/bias", ck.take(f"{name}.bias", (n_out,), f"[{out_name}]"), f"{name}.bias")

  if ck.layout == "hf":
    conv, cls, pos = ("embeddings.patch_embedding.weight", "embeddings.class_embedding",
                      "embeddings.position_embedding.weight")
    pre, post, blk = "pre_layrnorm", "post_layernorm", "encoder.layers.{}."
  else:
    conv, cls, pos = "conv1.weight", "class_embedding", "positional_embedding"
    pre, post, blk = "ln_pre", "ln_post", "transformer.resblocks.{}."
  # torch conv kernels are [out, in, kh, kw]; flax's [kh, kw, in, out].
  put("patch_embed/kernel", ck.take(conv, (d, None, p, p), "[width, channels, patch, patch]")
      .transpose(2, 3, 1, 0), conv)
  put("class_embedding", ck.take(cls, (d,), "[width]"), cls)
  put("pos_embedding", ck.take(pos, (n_pos, d), "[1 + (image_size/patch)**2, width]"), pos)
  ln("ln_pre", pre)
  for i in range(c["depth"]):
    b, ours = blk.format(i), f"block_{i}"
    if ck.layout == "hf":
      ln(f"{ours}/ln_1", b + "layer_norm1")
      ln(f"{ours}/ln_2", b + "layer_norm2")
      names = [f"{b}self_attn.{x}_proj" for x in "qkv"]
      w = [ck.take(f"{n}.weight", (d, d), "[width, width]") for n in names]
      bias = [ck.take(f"{n}.bias", (d,), "[width]") for n in names]
      put(f"{ours}/attn/qkv/kernel", np.concatenate([x.T for x in w], axis=1),
          *[f"{n}.weight" for n in names])
      put(f"{ours}/attn/qkv/bias", np.concatenate(bias), *[f"{n}.bias" for n in names])
      linear(f"{ours}/attn/out", b + "self_attn.out_proj", d, d, "width", "width")
      linear(f"{ours}/mlp/fc1", b + "mlp.fc1", m, d, "mlp_dim", "width")
      linear(f"{ours}/mlp/fc2", b + "mlp.fc2", d, m, "width", "mlp_dim")
    else:
      ln(f"{ours}/ln_1", b + "ln_1")
      ln(f"{ours}/ln_2", b + "ln_2")
      # nn.MultiheadAttention's fused in_proj is [q; k; v] stacked along its output rows.
      put(f"{ours}/attn/qkv/kernel",
          ck.take(b + "attn.in_proj_weight", (3 * d, d), "[3 * width, width]").T, b + "attn.in_proj_weight")
      put(f"{ours}/attn/qkv/bias", ck.take(b + "attn.in_proj_bias", (3 * d,), "[3 * width]"),
          b + "attn.in_proj_bias")
      linear(f"{ours}/attn/out", b + "attn.out_proj", d, d, "width", "width")
      linear(f"{ours}/mlp/fc1", b + "mlp.c_fc", m, d, "mlp_dim", "width")
      linear(f"{ours}/mlp/fc2", b + "mlp.c_proj", d, m, "width", "mlp_dim")
  ln("ln_post", post)
  if ck.proj_dim is not None:
    if ck.layout == "hf":
      w = ck.take("visual_projection.weight", (ck.proj_dim, d), "[proj_dim, width]", top=True)
      flat["proj/kernel"] = np.ascontiguousarray(w.T)
      src["proj/kernel"] = "'visual_projection.weight'"
    else:
      put("proj/kernel", ck.take("proj", (d, ck.proj_dim), "[width, proj_dim]"), "proj")

  # Anything else under the vision prefix is architecture we would silently drop (layer scale,
  # attention pooling, blocks beyond the configured depth...): refuse it. (HF checkpoints were already
  # filtered to the vision tower on reading; OpenAI files still hold the text tower, outside "visual.".)
  leftover = sorted(k for k in ck.tensors if k.startswith(ck.prefix) and k not in ck.used
                    and not k.endswith("position_ids"))   # a buffer older transformers saved
  if leftover:
    raise CheckpointError(
        f"{ck.source}: unexpected tensors {leftover[:6]}{' ...' if len(leftover) > 6 else ''} for a "
        f"CLIP ViT of {_size_str(c)}: a different architecture, or a config that does not match "
        "the weights.")
  return flat, src


# ---------------------------------------------------------------------------------------------------
# Public loading API


def _module_kwargs(ck: _Checkpoint, ln_post: bool, proj: bool) -> dict[str, Any]:
  kw = dict(ck.config, ln_post=ln_post)
  if kw["num_heads"] is None:
    raise CheckpointError(f"{ck.source}: width {kw['width']} is not a multiple of 64, so the head "
                          "count cannot follow OpenAI's rule: pass num_heads.")
  if proj:
    if ck.proj_dim is None:
      raise CheckpointError(f"{ck.source}: proj=True but the checkpoint has no image projection "
                            "('visual_projection.weight' / 'visual.proj').")
    kw["proj_dim"] = ck.proj_dim
  return kw


def clip_config(path: str | os.PathLike, *, ln_post: bool = False, proj: bool = False,
                act: str | None = None, num_heads: int | None = None) -> dict[str, Any]:
  """:class:`ViT` keyword arguments for a checkpoint's vision tower.

  ``width, depth, num_heads, patch_size, image_size, mlp_dim, act, ln_eps`` come from the checkpoint
  (its ``config.json``, or the tensor shapes of an OpenAI file, whose heads are ``width // 64`` and act
  quick-GELU unless ``num_heads`` / ``act`` say otherwise); ``ln_post`` is passed through and ``proj``
  adds ``proj_dim`` = the checkpoint's projection width. ``ViT(**clip_config(path))`` is the paper's
  tower; override ``image_size``, ``dtype``, ``remat`` as needed.
  """
  return _module_kwargs(_read(path, act, num_heads), ln_post, proj)


def _get_subtree(tree: Mapping[str, Any], at: str) -> Mapping[str, Any]:
  node = tree
  for i, key in enumerate(at.split("/")):
    if not isinstance(node, Mapping) or key not in node:
      where = "/".join(at.split("/")[:i]) or "the top level"
      keys = sorted(node) if isinstance(node, Mapping) else type(node).__name__
      raise ValueError(f"at={at!r}: no {key!r} under {where} of init_params (found {keys}).")
    node = node[key]
  return node


def _set_subtree(tree: Mapping[str, Any], at: str, value: Any) -> dict[str, Any]:
  head, _, rest = at.partition("/")
  out = dict(tree)
  out[head] = _set_subtree(tree[head], rest, value) if rest else value
  return out


def _load(ck: _Checkpoint, init_params: Any, *, at: str | None, dont_load: Sequence[str],
          grid: int | Sequence[int] | None, posemb_method: str,
          converted: tuple[dict[str, np.ndarray], dict[str, str]] | None = None) -> Any:
  from flax import traverse_util
  flat, src = converted or _convert(ck)
  sub = _get_subtree(init_params, at) if at else init_params
  target = traverse_util.flatten_dict(dict(sub), sep="/")
  skip = [re.compile(p) for p in dont_load]
  blocks = {n.split("/")[0] for n in target if n.startswith("block_")}
  width = target["class_embedding"].shape[0] if "class_embedding" in target else None
  if width is not None and width != ck.config["width"]:
    raise CheckpointError(f"{ck.source}: the checkpoint's width is {ck.config['width']}, the model's "
                          f"{width}: build the model from clip_config(path).")
  if blocks and len(blocks) != ck.config["depth"]:
    raise CheckpointError(f"{ck.source}: the checkpoint has {ck.config['depth']} blocks, the model "
                          f"{len(blocks)}: build the model from clip_config(path).")
  out = {}
  for name, leaf in sorted(target.items()):
    if any(p.fullmatch(name) for p in skip):
      if isinstance(leaf, jax.ShapeDtypeStruct):
        raise ValueError(f"dont_load keeps {name!r}, but init_params holds only its shape: pass "
                         "initialized params.")
      out[name] = leaf
      continue
    if name not in flat:
      hint = " (pass variables['params'], not the variables)" if name.startswith("params/") else ""
      raise CheckpointError(
          f"{ck.source}: the model's param {name!r} {tuple(leaf.shape)} has no counterpart in the "
          f"checkpoint{hint}; list it in dont_load to keep its initial value.")
    value = flat[name]
    if name == "pos_embedding" and value.shape != tuple(leaf.shape) and value.shape[1] == leaf.shape[1]:
      old = ck.config["image_size"] // ck.config["patch_size"]
      if grid is None:
        side = int(round(math.sqrt(leaf.shape[0] - 1)))
        new_grid = (side, side)
      else:
        new_grid = _pair(grid)
      value = resample_posemb(value, new_grid, old_grid=(old, old), method=posemb_method)
    if value.shape != tuple(leaf.shape):
      raise CheckpointError(
          f"{ck.source}: tensor {src[name]} gives param {name!r} the shape {value.shape}, but the model "
          f"expects {tuple(leaf.shape)} (checkpoint size: {_size_str(ck.config)}).")
    out[name] = np.asarray(value, dtype=leaf.dtype)
  loaded = traverse_util.unflatten_dict(out, sep="/")
  return _set_subtree(init_params, at, loaded) if at else loaded


def load(init_params: Any, path: str | os.PathLike, *, at: str | None = None,
         dont_load: Sequence[str] = (), grid: int | Sequence[int] | None = None,
         posemb_method: str = "bicubic") -> Any:
  """Fills ViT parameters from a CLIP checkpoint; the way to put CLIP weights inside a larger model.

  Args:
    init_params: the model's params (``variables['params']``, arrays or ``jax.eval_shape`` structs).
    path: a Hugging Face CLIP directory or an OpenAI checkpoint file.
    at: ``'/'``-separated path of the ViT's subtree in ``init_params`` (e.g. ``'encoder'``); None when
      ``init_params`` is the ViT's own tree. The rest of the tree is returned untouched.
    dont_load: regexes (full match, on names like ``'ln_post/scale'`` relative to the ViT) of params
      that keep their value from ``init_params``.
    grid: the model's patch grid when not square (default: square, from the position table's length).
    posemb_method: ``'bicubic'`` or ``'bilinear'`` resampling of the position embedding when the
      model's grid differs from the checkpoint's (the class position is kept).

  Returns:
    The tree of ``init_params`` with the ViT's leaves replaced by host numpy arrays (dtype of
    ``init_params``, float32 in practice); place them with ``parallel.replicate`` or ``jnp.asarray``.
    ``ln_post`` / ``proj`` of the checkpoint are used only if the model has them. Every model leaf must
    come from the checkpoint (or ``dont_load``) with the right shape, else :class:`CheckpointError`
    names the param and the tensor.
  """
  return _load(_read(path), init_params, at=at, dont_load=dont_load, grid=grid,
               posemb_method=posemb_method)


def load_clip(path: str | os.PathLike, *, image_size: int | Sequence[int] | None = None,
              dtype: Any = jnp.float32, ln_post: bool = False, proj: bool = False, remat: bool = False,
              act: str | None = None, num_heads: int | None = None,
              posemb_method: str = "bicubic") -> tuple[ViT, dict[str, Any]]:
  """A CLIP vision tower as ``(module, params)``: ``module.apply({'params': params}, images)``.

  The module's size comes from the checkpoint (see :func:`clip_config`); ``image_size`` other than the
  checkpoint's resamples the position embedding (``posemb_method``). ``params`` are float32 jax arrays
  on the default device. Raises :class:`CheckpointError` naming the tensor for a missing tensor, a
  wrong shape or an unknown layout.
  """
  ck = _read(path, act, num_heads)
  kw = _module_kwargs(ck, ln_post, proj)
  if image_size is not None:
    h, w = _pair(image_size)
    kw["image_size"] = h if h == w else (h, w)
  module = ViT(**kw, dtype=dtype, remat=remat)
  h, w = _pair(module.image_size)
  converted = _convert(ck)
  channels = converted[0]["patch_embed/kernel"].shape[2]
  template = jax.eval_shape(module.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, h, w, channels), jnp.float32))["params"]
  params = _load(ck, template, at=None, dont_load=(), grid=module.grid, posemb_method=posemb_method,
                 converted=converted)
  return module, jax.tree.map(jnp.asarray, params)
