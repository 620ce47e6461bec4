"""Tests of irgen_jax.models.vit: parity with Hugging Face CLIP and OpenAI-layout checkpoints, position
embedding resampling, loader errors, grafting into a larger model, variant shapes and dtypes.

Every checkpoint is a tiny randomly initialized CLIP tower made here (no network). All parameters,
LayerNorm gains and biases included, are perturbed away from their initial values so that a swapped or
transposed mapping cannot hide behind ones and zeros.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from irgen_jax.models import vit

VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              patch_size=8, image_size=32, hidden_act="quick_gelu", projection_dim=32)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)
TOL = 1e-4


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _images(size: int | tuple[int, int], n: int = 2, seed: int = 0) -> np.ndarray:
  h, w = (size, size) if isinstance(size, int) else size
  return np.random.default_rng(seed).normal(size=(n, h, w, 3)).astype(np.float32)


def _nchw(images: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


@functools.partial(jax.jit, static_argnums=0)
def _apply(module: vit.ViT, params, images):
  # One compilation per module configuration (modules compare by their fields), shared across tests.
  return module.apply({"params": params}, images)


def _ours(module: vit.ViT, params, images: np.ndarray) -> np.ndarray:
  return np.asarray(_apply(module, params, jnp.asarray(images)))


def _maxdiff(a, b) -> float:
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


@pytest.fixture(scope="module")
def hf_vision(tmp_path_factory):
  """(torch CLIPVisionModel, its save_pretrained directory)."""
  model = _perturb(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)), seed=1)
  path = str(tmp_path_factory.mktemp("hf_vision"))
  model.save_pretrained(path)
  return model, path


@pytest.fixture(scope="module")
def hf_full(tmp_path_factory):
  """(torch CLIPModel, its save_pretrained directory): vision tower + text tower + projections."""
  config = transformers.CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=32)
  model = _perturb(transformers.CLIPModel(config), seed=2)
  path = str(tmp_path_factory.mktemp("hf_full"))
  model.save_pretrained(path)
  return model, path


def _openai_state_dict(hf: transformers.CLIPVisionModel, proj: torch.Tensor) -> dict[str, torch.Tensor]:
  """The OpenAI CLIP layout (``visual.*``, fused in_proj) of an HF vision tower, plus text-tower decoys."""
  sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
  o = {"visual.class_embedding": sd["embeddings.class_embedding"],
       "visual.positional_embedding": sd["embeddings.position_embedding.weight"],
       "visual.conv1.weight": sd["embeddings.patch_embedding.weight"],
       "visual.proj": proj}
  for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
    for w in ("weight", "bias"):
      o[f"visual.{ours}.{w}"] = sd[f"{theirs}.{w}"]
  for i in range(VISION["num_hidden_layers"]):
    r, h = f"visual.transformer.resblocks.{i}.", f"encoder.layers.{i}."
    for w in ("weight", "bias"):
      o[f"{r}ln_1.{w}"] = sd[f"{h}layer_norm1.{w}"]
      o[f"{r}ln_2.{w}"] = sd[f"{h}layer_norm2.{w}"]
      o[f"{r}attn.out_proj.{w}"] = sd[f"{h}self_attn.out_proj.{w}"]
      o[f"{r}mlp.c_fc.{w}"] = sd[f"{h}mlp.fc1.{w}"]
      o[f"{r}mlp.c_proj.{w}"] = sd[f"{h}mlp.fc2.{w}"]
    o[f"{r}attn.in_proj_weight"] = torch.cat([sd[f"{h}self_attn.{x}_proj.weight"] for x in "qkv"], 0)
    o[f"{r}attn.in_proj_bias"] = torch.cat([sd[f"{h}self_attn.{x}_proj.bias"] for x in "qkv"], 0)
  # A full OpenAI file also holds the text tower, whose blocks sit under "transformer.resblocks.".
  o["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(96, 32)
  o["token_embedding.weight"] = torch.zeros(100, 32)
  o["logit_scale"] = torch.tensor(4.6)
  return o


class _Holder(torch.nn.Module):
  """A parameter container whose scripted form is a TorchScript archive with chosen parameter names."""

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x


def _torchscript(state_dict: dict[str, torch.Tensor]) -> torch.jit.ScriptModule:
  root = _Holder()
  for name, value in state_dict.items():
    *path, leaf = name.split(".")
    node = root
    for part in path:
      if not hasattr(node, part):
        node.add_module(part, _Holder())
      node = getattr(node, part)
    node.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
  return torch.jit.script(root)


@pytest.fixture(scope="module")
def openai_files(hf_vision, tmp_path_factory):
  """(state-dict file, TorchScript file, projection [64, 32]) in the OpenAI layout."""
  torch.manual_seed(3)
  proj = torch.randn(VISION["hidden_size"], VISION["projection_dim"]) * 0.1
  sd = _openai_state_dict(hf_vision[0], proj)
  d = tmp_path_factory.mktemp("openai")
  torch.save(sd, d / "clip_sd.pt")
  _torchscript(sd).save(str(d / "clip_jit.pt"))
  return str(d / "clip_sd.pt"), str(d / "clip_jit.pt"), proj.numpy()


# ---------------------------------------------------------------------------------------------------
# Parity


def test_hf_last_hidden_state_is_before_post_layernorm(hf_vision):
  # What the parity tests compare: in transformers 5.24 CLIPVisionModel returns last_hidden_state =
  # the last encoder block's output (no post_layernorm), and pooler_output = post_layernorm(token 0).
  model, _ = hf_vision
  with torch.no_grad():
    out = model(pixel_values=_nchw(_images(32)), output_hidden_states=True)
    np.testing.assert_array_equal(out.last_hidden_state.numpy(), out.hidden_states[-1].numpy())
    np.testing.assert_allclose(model.post_layernorm(out.last_hidden_state[:, 0]).numpy(),
                               out.pooler_output.numpy(), atol=1e-6)
    assert _maxdiff(out.last_hidden_state[:, 0], out.pooler_output) > 0.1


def test_parity_hf_vision_model(hf_vision):
  model, path = hf_vision
  images = _images(32)
  module, params = vit.load_clip(path)
  assert (module.width, module.depth, module.num_heads, module.patch_size, module.image_size,
          module.mlp_dim, module.act) == (64, 2, 4, 8, 32, 256, "quick_gelu")
  with torch.no_grad():
    out = model(pixel_values=_nchw(images))
  tokens = _ours(module, params, images)
  diff = _maxdiff(tokens, out.last_hidden_state)
  print(f"\nHF CLIPVisionModel last_hidden_state vs ours (before ln_post), max abs diff {diff:.2e}")
  assert tokens.shape == (2, 17, 64) and tokens.dtype == np.float32
  assert diff < TOL
  # With ln_post, token 0 is HF's pooler_output (post_layernorm of the class token).
  module_ln, params_ln = vit.load_clip(path, ln_post=True)
  diff = _maxdiff(_ours(module_ln, params_ln, images)[:, 0], out.pooler_output)
  print(f"HF pooler_output vs our ln_post token 0, max abs diff {diff:.2e}")
  assert diff < TOL


def test_parity_hf_clip_model(hf_full):
  model, path = hf_full
  images = _images(32, seed=1)
  module, params = vit.load_clip(path)
  with torch.no_grad():
    out = model.vision_model(pixel_values=_nchw(images))
    image_embeds = model.visual_projection(out.pooler_output)
  diff = _maxdiff(_ours(module, params, images), out.last_hidden_state)
  print(f"\nHF CLIPModel.vision_model last_hidden_state vs ours, max abs diff {diff:.2e}")
  assert diff < TOL
  # ln_post + proj: token 0 is CLIP's image embedding (before L2 normalization).
  module_p, params_p = vit.load_clip(path, ln_post=True, proj=True)
  assert module_p.proj_dim == 32 and params_p["proj"]["kernel"].shape == (64, 32)
  diff = _maxdiff(_ours(module_p, params_p, images)[:, 0], image_embeds)
  print(f"HF CLIPModel image embeds vs our ln_post+proj token 0, max abs diff {diff:.2e}")
  assert diff < TOL


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_parity_openai_layout(hf_vision, openai_files, tmp_path):
  model, _ = hf_vision
  sd_file, jit_file, proj = openai_files
  images = _images(32, seed=2)
  with torch.no_grad():
    out = model(pixel_values=_nchw(images))
  # OpenAI files do not store the head count; their rule is width // 64 (= 1 here, the HF model has 4).
  assert vit.clip_config(sd_file)["num_heads"] == 1
  for name, f in (("state dict", sd_file), ("TorchScript", jit_file)):
    module, params = vit.load_clip(f, num_heads=4)
    assert (module.width, module.depth, module.patch_size, module.image_size, module.act) == (
        64, 2, 8, 32, "quick_gelu")
    diff = _maxdiff(_ours(module, params, images), out.last_hidden_state)
    print(f"\nOpenAI-layout {name} vs HF last_hidden_state, max abs diff {diff:.2e}")
    assert diff < TOL
  module, params = vit.load_clip(sd_file, num_heads=4, ln_post=True, proj=True)
  diff = _maxdiff(_ours(module, params, images)[:, 0], out.pooler_output.numpy() @ proj)
  print(f"OpenAI-layout ln_post+proj token 0 vs HF pooler_output @ proj, max abs diff {diff:.2e}")
  assert diff < TOL
  # Half-precision checkpoints (as OpenAI's TorchScript files are) load as float32 parameters.
  half = {k: v.half() for k, v in torch.load(sd_file, weights_only=True).items()}
  torch.save(half, tmp_path / "half.pt")
  module, params = vit.load_clip(tmp_path / "half.pt", num_heads=4)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert _maxdiff(_ours(module, params, images), out.last_hidden_state) < 0.05


# ---------------------------------------------------------------------------------------------------
# Position-embedding resampling


@pytest.mark.parametrize("size", [(24, 24), (48, 48), (32, 48)])
def test_resampled_posemb_matches_hf_interpolation(hf_vision, size):
  # HF's interpolate_pos_encoding resizes the patch grid with torch bicubic (align_corners=False):
  # loading at another image size must give the same tokens (down, up, and to a non-square grid).
  model, path = hf_vision
  module, params = vit.load_clip(path, image_size=size)
  n = (size[0] // 8) * (size[1] // 8)
  assert module.grid == (size[0] // 8, size[1] // 8)
  assert params["pos_embedding"].shape == (1 + n, 64)
  images = _images(size, seed=3)
  with torch.no_grad():
    ref = model(pixel_values=_nchw(images), interpolate_pos_encoding=True).last_hidden_state
  tokens = _ours(module, params, images)
  assert tokens.shape == (2, 1 + n, 64)
  diff = _maxdiff(tokens, ref)
  print(f"\nimage {size}: resampled position embedding vs HF interpolate_pos_encoding, max abs diff "
        f"{diff:.2e}")
  assert diff < TOL
  original = model.embeddings.position_embedding.weight.detach().numpy()
  np.testing.assert_array_equal(np.asarray(params["pos_embedding"][0]), original[0])  # class kept


def test_hf_directory_forms_load_the_same_params(hf_vision, tmp_path):
  # pytorch_model.bin (older directories) and sharded safetensors (large models) read like
  # model.safetensors; so does a 4.x-style vision checkpoint whose names start with "vision_model.".
  _, path = hf_vision
  _, params = vit.load_clip(path)
  tensors = load_file(os.path.join(path, "model.safetensors"))
  for form in ("bin", "sharded", "prefixed"):
    d = tmp_path / form
    d.mkdir()
    shutil.copy(os.path.join(path, "config.json"), d / "config.json")
    if form == "bin":
      torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, d / "pytorch_model.bin")
    elif form == "sharded":
      names = sorted(tensors)
      shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
      for f, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(d / f))
      index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
      (d / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
      save_file({"vision_model." + k: v for k, v in tensors.items()}, str(d / "model.safetensors"))
    _, other = vit.load_clip(d)
    jax.tree.map(np.testing.assert_array_equal, other, params)


def test_same_size_load_is_identical(hf_vision):
  _, path = hf_vision
  _, params = vit.load_clip(path)
  _, same = vit.load_clip(path, image_size=32)
  jax.tree.map(np.testing.assert_array_equal, params, same)
  pos = np.asarray(params["pos_embedding"])
  np.testing.assert_array_equal(vit.resample_posemb(pos, 4), pos)


@pytest.mark.parametrize("method,mode", [("bilinear", "bilinear"), ("bicubic", "bicubic")])
@pytest.mark.parametrize("new_grid", [(6, 5), (3, 2)])
def test_resample_posemb_matches_torch_interpolate(method, mode, new_grid):
  pos = np.random.default_rng(4).normal(size=(1 + 16, 8)).astype(np.float32)
  ours = vit.resample_posemb(pos, new_grid, method=method)
  grid = torch.from_numpy(pos[1:].reshape(1, 4, 4, 8)).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(grid, size=new_grid, mode=mode, align_corners=False)
  ref = ref.permute(0, 2, 3, 1).reshape(-1, 8).numpy()
  assert ours.shape == (1 + new_grid[0] * new_grid[1], 8)
  np.testing.assert_array_equal(ours[0], pos[0])
  np.testing.assert_allclose(ours[1:], ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Errors


def _edited_hf_dir(src: str, dst, edit) -> str:
  os.makedirs(dst, exist_ok=True)
  shutil.copy(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))
  tensors = load_file(os.path.join(src, "model.safetensors"))
  edit(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"))
  return str(dst)


def test_missing_and_misshapen_tensors_are_named(hf_vision, openai_files, tmp_path):
  _, path = hf_vision
  missing = _edited_hf_dir(path, tmp_path / "missing",
                           lambda t: t.pop("encoder.layers.1.self_attn.v_proj.bias"))
  with pytest.raises(vit.CheckpointError,
                     match=r"missing tensor 'encoder\.layers\.1\.self_attn\.v_proj\.bias' "
                           r"\(expected shape \(64\)"):
    vit.load_clip(missing)

  def shrink(t):
    t["encoder.layers.0.mlp.fc1.weight"] = t["encoder.layers.0.mlp.fc1.weight"][:, :32].copy()
  wrong = _edited_hf_dir(path, tmp_path / "wrong", shrink)
  with pytest.raises(vit.CheckpointError,
                     match=r"'encoder\.layers\.0\.mlp\.fc1\.weight' has shape \(256, 32\); "
                           r"expected \(256, 64\) = \[mlp_dim, width\]"):
    vit.load_clip(wrong)

  def extra(t):
    t["encoder.layers.0.layer_scale.gamma"] = np.ones(64, np.float32)
  with pytest.raises(vit.CheckpointError, match=r"unexpected tensors \['encoder\.layers\.0\.layer_scale"):
    vit.load_clip(_edited_hf_dir(path, tmp_path / "extra", extra))

  # A config that disagrees with the weights (one layer declared, two stored).
  shallow = _edited_hf_dir(path, tmp_path / "shallow", lambda t: None)
  cfg = json.load(open(os.path.join(shallow, "config.json")))
  json.dump({**cfg, "num_hidden_layers": 1}, open(os.path.join(shallow, "config.json"), "w"))
  with pytest.raises(vit.CheckpointError, match=r"unexpected tensors \['encoder\.layers\.1\."):
    vit.load_clip(shallow)

  sd_file = openai_files[0]
  sd = torch.load(sd_file, weights_only=True)
  del sd["visual.transformer.resblocks.1.attn.in_proj_bias"]
  torch.save(sd, tmp_path / "missing.pt")
  with pytest.raises(vit.CheckpointError,
                     match=r"missing tensor 'visual\.transformer\.resblocks\.1\.attn\.in_proj_bias'"):
    vit.load_clip(tmp_path / "missing.pt", num_heads=4)


def test_unknown_layouts_are_refused(tmp_path):
  torch.save({"backbone.stem.weight": torch.zeros(3)}, tmp_path / "other.pt")
  with pytest.raises(vit.CheckpointError, match="unknown layout"):
    vit.load_clip(tmp_path / "other.pt")
  (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
  with pytest.raises(vit.CheckpointError, match="not a TorchScript archive or a PyTorch state dict"):
    vit.load_clip(tmp_path / "junk.pt")
  torch.save({"visual.layer1.0.conv1.weight": torch.zeros(3)}, tmp_path / "rn50.pt")
  with pytest.raises(vit.CheckpointError, match="ResNet"):
    vit.load_clip(tmp_path / "rn50.pt")
  (tmp_path / "bert").mkdir()
  (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(vit.CheckpointError, match="unknown layout"):
    vit.load_clip(tmp_path / "bert")
  with pytest.raises(FileNotFoundError):
    vit.load_clip(tmp_path / "nowhere.pt")


def test_load_into_wrong_model_names_the_param(hf_vision):
  _, path = hf_vision
  narrow = vit.ViT(width=32, depth=2, num_heads=4, patch_size=8, image_size=32)
  template = jax.eval_shape(narrow.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  with pytest.raises(vit.CheckpointError, match="the checkpoint's width is 64, the model's 32"):
    vit.load(template, path)
  wide_mlp = vit.ViT(width=64, depth=2, num_heads=4, patch_size=8, image_size=32, mlp_dim=128)
  template = jax.eval_shape(wide_mlp.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  with pytest.raises(vit.CheckpointError,
                     match=r"tensor 'encoder\.layers\.0\.mlp\.fc1\.bias' gives param "
                           r"'block_0/mlp/fc1/bias' the shape \(256,\), but the model expects \(128,\)"):
    vit.load(template, path)
  deep = vit.ViT(width=64, depth=3, num_heads=4, patch_size=8, image_size=32)
  template = jax.eval_shape(deep.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  with pytest.raises(vit.CheckpointError, match="the checkpoint has 2 blocks, the model 3"):
    vit.load(template, path)
  with_proj = vit.ViT(**vit.clip_config(path, ln_post=True), proj_dim=32)
  template = jax.eval_shape(with_proj.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  with pytest.raises(vit.CheckpointError, match=r"param 'proj/kernel' \(64, 32\) has no counterpart"):
    vit.load(template, path)  # a CLIPVisionModel has no projection
  with pytest.raises(vit.CheckpointError, match="no image projection"):
    vit.load_clip(path, proj=True)


def test_wrong_image_size_is_refused():
  module = vit.ViT(width=16, depth=1, num_heads=2, patch_size=8, image_size=32)
  with pytest.raises(ValueError, match=r"images have shape \(1, 24, 24, 3\): expected \[B, 32, 32, C\]"):
    module.init(jax.random.key(0), jnp.zeros((1, 24, 24, 3)))
  with pytest.raises(ValueError, match="variant='X/16'"):
    vit.Model("X/16")


# ---------------------------------------------------------------------------------------------------
# Grafting into a larger model


class _Retrieverish(nn.Module):
  encoder: vit.ViT

  @nn.compact
  def __call__(self, images):
    return nn.Dense(5, name="head")(self.encoder(images)[:, 0])


def _random_like(template, seed: int):
  # Random values for an eval_shape template. (module.init would do, but compiling threefry for every
  # parameter costs ~2 s per block on a 2-core CPU.)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (0.1 * rng.normal(size=x.shape)).astype(x.dtype), template)


def test_load_grafts_into_a_larger_model(hf_full):
  _, path = hf_full
  encoder = vit.ViT(**vit.clip_config(path, ln_post=True, proj=True))
  model = _Retrieverish(encoder)
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  params = _random_like(template, seed=7)              # stands for the larger model's fresh init
  loaded = vit.load(params, path, at="encoder")
  _, reference = vit.load_clip(path, ln_post=True, proj=True)
  jax.tree.map(np.testing.assert_array_equal, loaded["encoder"], reference)
  jax.tree.map(np.testing.assert_array_equal, loaded["head"], params["head"])   # untouched
  images = _images(32, seed=5)
  head_in = _ours(encoder, loaded["encoder"], images)[:, 0]
  head = params["head"]
  np.testing.assert_allclose(np.asarray(jax.jit(model.apply)({"params": loaded}, jnp.asarray(images))),
                             head_in @ head["kernel"] + head["bias"], atol=1e-5)
  kept = vit.load(params["encoder"], path, dont_load=["ln_pre/.*", "proj/kernel"])
  jax.tree.map(np.testing.assert_array_equal, kept["ln_pre"], params["encoder"]["ln_pre"])
  np.testing.assert_array_equal(kept["proj"]["kernel"], params["encoder"]["proj"]["kernel"])
  np.testing.assert_array_equal(kept["ln_post"]["scale"], reference["ln_post"]["scale"])
  with pytest.raises(ValueError, match="at='decoder'"):
    vit.load(params, path, at="decoder")
  with pytest.raises(ValueError, match="holds only its shape"):
    vit.load(template["encoder"], path, dont_load=["ln_pre/.*"])


# ---------------------------------------------------------------------------------------------------
# Variants, dtypes, remat


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_b16_shapes_and_parameter_count():
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  counts = {}
  for kw in ({}, {"ln_post": True, "proj_dim": 512}):
    module = vit.Model("B/16", **kw)
    params = jax.eval_shape(module.init, jax.random.key(0), images)["params"]
    out = jax.eval_shape(module.apply, {"params": params}, images)
    counts[bool(kw)] = _count(params)
    assert out.shape == (2, 197, 512 if kw else 768) and out.dtype == jnp.float32
    assert params["pos_embedding"].shape == (197, 768)
    assert params["block_11"]["attn"]["qkv"]["kernel"].shape == (768, 2304)
  print(f"\nViT-B/16 parameters: {counts[False]:,} (tokens before ln_post), {counts[True]:,} with "
        "ln_post + proj 512")
  # 86,192,640 is the parameter count of OpenAI CLIP ViT-B/16's visual tower.
  assert counts == {False: 85_797_888, True: 86_192_640}


@pytest.mark.parametrize("variant,image,tokens,width", [("Ti/16", 224, 197, 192), ("S/32", 224, 50, 384),
                                                        ("L/14", 224, 257, 1024), ("B/16", 384, 577, 768)])
def test_variant_shapes(variant, image, tokens, width):
  module = vit.Model(variant, image_size=image, dtype=jnp.bfloat16)
  images = jax.ShapeDtypeStruct((1, image, image, 3), jnp.float32)
  params = jax.eval_shape(module.init, jax.random.key(0), images)["params"]
  out = jax.eval_shape(module.apply, {"params": params}, images)
  assert out.shape == (1, tokens, width) and out.dtype == jnp.bfloat16
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  assert len([k for k in params if k.startswith("block_")]) == vit.VARIANTS[variant.split("/")[0]]["depth"]


def test_bfloat16_compute_and_remat(hf_vision):
  _, path = hf_vision
  f32, params = vit.load_clip(path)
  images = jnp.asarray(_images(32, seed=6))
  ref = _ours(f32, params, images)
  # bfloat16 compute: the same float32 params, bfloat16 tokens close to the float32 ones.
  bf16, bf16_params = vit.load_clip(path, dtype=jnp.bfloat16)
  jax.tree.map(np.testing.assert_array_equal, bf16_params, params)
  assert {x.dtype for x in jax.tree.leaves(bf16_params)} == {jnp.dtype(jnp.float32)}
  out = _apply(bf16, params, images)
  assert out.dtype == jnp.bfloat16
  err = float(np.max(np.abs(np.asarray(out, np.float32) - ref)) / np.max(np.abs(ref)))
  print(f"\nbfloat16 vs float32 tokens: max abs diff / max abs = {err:.2e}")
  assert 0 < err < 0.03
  # ...with the LayerNorm statistics (rsqrt: ln_pre + 2 per block) and the softmax (exp: 1 per block)
  # computed in float32.
  program = str(jax.make_jaxpr(bf16.apply)({"params": params}, images))
  found = re.findall(r"(\w+)\[[\d,]*\] = (rsqrt|exp)\b", program)
  assert sorted(found) == [("f32", "exp")] * 2 + [("f32", "rsqrt")] * 5, found
  # remat: the same param tree and tokens, and the backward pass recomputes each block (a checkpoint
  # per block in the gradient's program; gradients themselves are jax.checkpoint's business).
  remat, remat_params = vit.load_clip(path, remat=True)
  assert remat.remat and jax.tree.structure(remat_params) == jax.tree.structure(params)
  np.testing.assert_allclose(_ours(remat, params, images), ref, atol=1e-6)
  loss = lambda m: (lambda p: jnp.sum(m.apply({"params": p}, images)))
  count = lambda m: len(re.findall(r"\b(?:remat2|checkpoint)\[", str(jax.make_jaxpr(jax.grad(loss(m)))(params))))
  assert (count(f32), count(remat)) == (0, 2)
