"""Parameter counts of the project's models, from shapes only (``jax.eval_shape``: no weights, no compute).

  .venv/bin/python benchmarks/model_sizes.py [--json PATH]

Every model is built the way a run builds it: ``get_config()`` of a file in configs/, then
``trainers/tokenizer.py build_model`` / ``trainers/retriever.py build_model``. An encoder initialized from
CLIP without a checkpoint on this machine is built from the config's own sizes (``aot.shapes_config``: the
base config's ViT-B/16 with quick-GELU, the architecture of OpenAI's CLIP ViT-B/16). Class counts are
``data.registry.NUM_CLASSES`` (In-shop 7,982 item ids, CUB 200, Cars 196, Fashion-MNIST 10).

Rows:
  retriever/paper          configs/inshop.py (the paper's sizes; the same for cub200.py, cars196.py):
                           ViT-B/16 at 224 + 12-block width-768 decoder, M = 4, L = 256
  retriever/paper_24       the same with 24 decoder blocks
  tokenizer/<dataset>      configs/<dataset>.py's tokenizer: encoder + its classifier heads over the classes
  */fashion_mnist          configs/fashion_mnist.py defaults (the README's CPU run)

Columns: total parameters, the encoder's, the rest (decoder, or the tokenizer's projection and heads), and
float32 MiB of the parameters (AdamW keeps two more copies of the same size).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


from irgen_jax import aot  # noqa: E402
from irgen_jax.data import registry  # noqa: E402
from irgen_jax.models import build  # noqa: E402
from irgen_jax.models import retriever as retriever_model  # noqa: E402


def load_config(name: str, arg: str | None = None):
  """``configs/<name>.py``'s ``get_config(arg)``, relaxed to shapes (no CLIP checkpoint needed)."""
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return aot.shapes_config(module.get_config(arg))


def retriever_counts(c) -> dict[str, Any]:
  model = build.retriever(c)
  counts = retriever_model.param_counts(model)  # jax.eval_shape of model.init
  enc = model.encoder
  return {"total": counts["total"], "encoder": counts["encoder"], "rest": counts["decoder"],
          "encoder_arch": f"ViT w{enc.width} d{enc.depth} p{enc.patch_size} @{c.data.image_size}",
          "rest_arch": f"decoder w{c.retriever.decoder.width} d{c.retriever.decoder.depth}, "
                       f"M={c.ids.length} L={c.ids.codebook_size}"}


def tokenizer_counts(c, num_classes: int) -> dict[str, Any]:
  model = build.tokenizer(c, num_classes)
  s = c.data.image_size
  params = build.tokenizer_param_shapes(c, model)
  total = retriever_model.count_params(params)
  encoder = retriever_model.count_params(params["encoder"])
  enc = model.encoder
  heads = sorted(k for k in params if k != "encoder")
  return {"total": total, "encoder": encoder, "rest": total - encoder,
          "encoder_arch": f"ViT w{enc.width} d{enc.depth} p{enc.patch_size} @{s}",
          "rest_arch": f"{'+'.join(heads)} over {num_classes} classes"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--json", help="also write the counts to this JSON file")
  args = p.parse_args(argv)

  rows: dict[str, dict[str, Any]] = {}
  paper = load_config("inshop")
  rows["retriever/paper"] = retriever_counts(paper)
  deep = load_config("inshop")
  deep.retriever.decoder.depth = 24
  rows["retriever/paper_24"] = retriever_counts(deep)
  for name in ("cub200", "cars196"):  # the retriever does not depend on the dataset: check it
    other = retriever_counts(load_config(name))
    if other["total"] != rows["retriever/paper"]["total"]:
      rows[f"retriever/{name}"] = other
  for name in ("inshop", "cub200", "cars196"):
    rows[f"tokenizer/{name}"] = tokenizer_counts(load_config(name), registry.NUM_CLASSES[name])
  fm = load_config("fashion_mnist")
  rows["tokenizer/fashion_mnist"] = tokenizer_counts(fm, registry.NUM_CLASSES["fashion_mnist"])
  rows["retriever/fashion_mnist"] = retriever_counts(fm)

  header = ("model", "total", "encoder", "rest", "MiB f32", "encoder arch", "rest")
  table = [(k, f"{v['total']:,}", f"{v['encoder']:,}", f"{v['rest']:,}", f"{v['total'] * 4 / 2**20:.1f}",
            v["encoder_arch"], v["rest_arch"]) for k, v in rows.items()]
  width = [max(len(r[i]) for r in table + [header]) for i in range(len(header))]
  right = {1, 2, 3, 4}
  line = lambda r: " | ".join(v.rjust(w) if i in right else v.ljust(w)  # noqa: E731
                              for i, (v, w) in enumerate(zip(r, width)))
  print(line(header))
  print("-+-".join("-" * w for w in width))
  for r in table:
    print(line(r))
  out = {k: {"total": v["total"], "encoder": v["encoder"], "rest": v["rest"]} for k, v in rows.items()}
  print(json.dumps(out))
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(out, fh, indent=2)
  return out


if __name__ == "__main__":
  main()
