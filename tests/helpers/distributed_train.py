"""The tokenizer stage in one of several processes on this machine (multi-host training on CPU).

  python tests/helpers/distributed_train.py WORKDIR DATA_DIR NUM_PROCESSES PROCESS_ID PORT LOCAL_DEVICES

Every process gets ``LOCAL_DEVICES`` fake CPU devices; with ``NUM_PROCESSES > 1`` the launch
environment of a real multi-host job is set (``IRGEN_COORDINATOR_ADDRESS=127.0.0.1:PORT``,
``IRGEN_NUM_PROCESSES``, ``IRGEN_PROCESS_ID``) and ``parallel.maybe_initialize_distributed()`` joins
the processes, as ``irgen_jax.main`` does. Then the real tokenizer stage runs
(``irgen_jax.stages.run`` with ``stages=data,tokenizer``): each process loads its slice of every global batch
(``pipeline.train_iterator``), the loop places it (``parallel.global_batch_from_local``), checkpoints
are written by every process into the shared workdir, codebook refits and the final identifiers
gather features from every process. Metrics are logged every step (``WORKDIR/tokenizer/metrics.jsonl``,
process 0), so tests compare the per-step losses with those of a one-process run.

"""

import importlib.util
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def config(data_dir: str):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs", "inshop.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("runlocal")
  c.stages = "data,tokenizer,retriever"
  c.data.update(data_dir=data_dir, max_database=0, max_queries=0,
                synthetic=dict(num_classes=4, image_shape=(40, 40, 3), num_database=64,
                               num_queries=8))
  # 64 images / 16 per batch = 4 steps per epoch, 2 epochs, a refit at steps 0 and 4, checkpoints
  # at steps 3, 6 and 8.
  c.tokenizer.update(batch_size=16, num_epochs=2.0)
  c.retriever.update(batch_size=16, num_epochs=1.0)
  c.search.query_batch_size = 8
  c.checkpoint.every_steps = 3
  c.log_every_steps = 1
  return c


def main(argv):
  workdir, data_dir = argv[1], argv[2]
  num_processes, process_id, port, local_devices = (int(a) for a in argv[3:7])
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={local_devices}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if num_processes > 1:
    os.environ.update(IRGEN_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                      IRGEN_NUM_PROCESSES=str(num_processes), IRGEN_PROCESS_ID=str(process_id))
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=g-import-not-at-top

  from irgen_jax import parallel, stages  # pylint: disable=g-import-not-at-top

  parallel.maybe_initialize_distributed()
  assert jax.process_count() == num_processes, (jax.process_count(), num_processes)
  assert jax.device_count() == num_processes * local_devices, jax.devices()
  stages.run(config(data_dir), workdir)
  print(f"process {jax.process_index()}/{jax.process_count()} done, {jax.device_count()} devices",
        flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
