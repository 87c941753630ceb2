"""Runs an ablation grid (rows x datasets x seeds) through launch/train.py and tabulates mean ± std.

Each run is its own `launch/train.py` process and work directory (`<out>/<dataset>/<row>/seed<s>`); a run
whose results.json exists is not repeated, so an interrupted sweep resumes. Every table carries the
untrained row (the first row's config at step 0, same seeds) beside the trained ones.

  python launch/ablation.py --plan ssl_anovae --datasets oct_phantom,brainmri,busi --seeds 0,1,2 \
      --out runs/ablation --table docs_table.md
  python launch/ablation.py --plan ssl_anovae_views --datasets oct_phantom --seeds 0,1,2 --out runs/ablation
  python launch/ablation.py --plan latent_diffusion --datasets phantom,oct_phantom,brainmri,busi --rows 0 \
      --seeds 0,1,2 --out runs/ldm   # rescoring grids on these runs: launch/evaluate.py --set / --untrained
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import NamedTuple

import numpy as np
from absl import app, flags

from mediclip_jax import config_utils

COLUMNS = (("image AUROC", "image_auroc"), ("pixel AUROC", "pixel_auroc"), ("Dice (threshold)", "seg_threshold_dice"),
           ("Dice (layer-wise)", "seg_layers_dice"), ("staging NMI", "staging_nmi"), ("staging ARI", "staging_ari"))
TEXT_COLUMNS = (("zero-shot AUROC", "zeroshot_auroc"), ("zero-shot accuracy", "zeroshot_accuracy"),
                ("i2t R@1", "i2t_recall@1"), ("t2i R@1", "t2i_recall@1"), ("i2t R@5", "i2t_recall@5"),
                ("noise AUROC (-s)", "noise_auroc"))
DETECTOR_COLUMNS = (("image AUROC", "image_auroc"), ("image AP", "image_ap"), ("pixel AUROC", "pixel_auroc"),
                    ("pixel AUPRO", "pixel_aupro"))


class Plan(NamedTuple):
  """config file, its fixed arguments, rows (label, extra config arguments and `--config.x=y` overrides), the
  table's columns, and per dataset: its config argument and overrides. Overrides may name {seed}, {dataset} and
  {source_runs} (the --source_runs flag: another sweep's --out, whose runs this one builds on)."""
  config: str
  fixed: str
  rows: tuple
  columns: tuple = COLUMNS
  dataset_args: dict | None = None
  dataset_overrides: dict | None = None


_FP_RATES = (0.0, 0.2, 0.4, 0.6)
# The chain: MediCLIP (tiny, random init) on towers adapted by the `mirage` plan's runs of the same seed. BUSI is
# evaluated on the images whose captions the adaptation never saw (its runs' heldout_dataset).
_CHAIN_CKPT = "--config.model.clip.checkpoint={source_runs}/%s/row%d/seed{seed}/clip"
PLANS = {
    "ssl_anovae": Plan("configs/ssl_anovae.py", "tiny", (
        ("concatenation [z_I ; z_S] (paper)", ""),
        ("plain VAE (z_I only)", "latents=image"),
        ("z_S only", "latents=ssl"),
        ("SSL pretrained, then frozen", "ssl_mode=pretrain_frozen"),
        ("no adversarial term", "adv=0"),
    )),
    "ssl_anovae_views": Plan("configs/ssl_anovae.py", "tiny", (
        ("views=oct", "views=oct"),
        ("views=grey", "views=grey"),
        ("views=fundus", "views=fundus"),
        ("views=geometric", "views=geometric"),
        ("views=photometric", "views=photometric"),
        ("views=cutout", "views=cutout"),
        ("views=none (identity)", "views=none"),
    )),
    # rows 2i / 2i+1: InfoNCE / MIRAGE at false-positive rate _FP_RATES[i]
    "mirage": Plan("configs/mirage.py", "tiny", tuple(
        (f"{name} fp_rate={p}", f"loss={loss},fp_rate={p}") for p in _FP_RATES
        for name, loss in (("InfoNCE", "infonce"), ("MIRAGE", "mirage"))), TEXT_COLUMNS),
    "latent_diffusion": Plan("configs/latent_diffusion.py", "tiny", (
        ("latent diffusion (ε, Gaussian noise)", ""),
        ("v-prediction", "prediction=v"),
        ("Perlin noise (AnoDDPM-style)", "noise=perlin"),
    ), DETECTOR_COLUMNS),
    "mirage_chain": Plan("configs/busi.py", "tiny", (
        ("unadapted random-init towers", ""),
        ("InfoNCE-adapted towers (fp_rate=0)", _CHAIN_CKPT % ("{pairs}", 0)),
        ("MIRAGE-adapted towers (fp_rate=0)", _CHAIN_CKPT % ("{pairs}", 1)),
        ("InfoNCE-adapted towers (fp_rate=0.4)", _CHAIN_CKPT % ("{pairs}", 4)),
        ("MIRAGE-adapted towers (fp_rate=0.4)", _CHAIN_CKPT % ("{pairs}", 5)),
    ), DETECTOR_COLUMNS, dataset_args={"phantom": "phantom", "busi": ""},
        # at the adaptation's 64 px; evaluated at the end only (the table reads the untrained and last rows)
        dataset_overrides={"phantom": "--config.data.image_size=64 --config.data.phantom_size=64 "
                                      "--config.eval.every_epochs=20",
                           "busi": "--config.data.image_size=64 --config.eval.every_epochs=20 "
                                   "--config.data.root={source_runs}/busi_captions/row0/seed{seed}/heldout_dataset"}),
}
UNTRAINED = "untrained (step 0)"

_PLAN = flags.DEFINE_enum("plan", "ssl_anovae", sorted(PLANS), "Which grid to run.")
_SOURCE_RUNS = flags.DEFINE_string("source_runs", None, "mirage_chain: the --out of the `mirage` sweep whose "
                                   "adapted towers (and held-out BUSI listing) the chain uses.")
_DATASETS = flags.DEFINE_list("datasets", ["oct_phantom"], "Dataset arguments of the plan's config.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "config.seed values.")
_ROWS = flags.DEFINE_list("rows", None, "Indices of the plan's rows to run (default: all).")
_OUT = flags.DEFINE_string("out", None, "Root of the runs' work directories.", required=True)
_TABLE = flags.DEFINE_string("table", None, "Also write the markdown table here.")
_EXTRA = flags.DEFINE_multi_string("override", [], "--config.x=y overrides given to every run.")
_DRY = flags.DEFINE_bool("dry_run", False, "Print the commands only.")
_JOBS = flags.DEFINE_integer("jobs", 1, "Runs at a time.")
_CACHE = flags.DEFINE_string("compilation_cache", None, "JAX persistent compilation cache shared by the runs "
                             "(seeds of a row compile the same programs); default <out>/jax_cache, empty: none.")


def run_dir(out: str, dataset: str, row: int, seed: str) -> str:
  return os.path.join(out, dataset, f"row{row}", f"seed{seed}")


_CHAIN_PAIRS = {"phantom": "phantom_reports", "busi": "busi_captions"}


def command(plan: Plan, row_args: str, dataset: str, seed: str, workdir: str, extra: list[str],
            source_runs: str | None = None) -> list[str]:
  """The launch/train.py command of one run: config arguments and overrides, placeholders filled."""
  words = " ".join(a for a in (row_args, (plan.dataset_overrides or {}).get(dataset, "")) if a).split()
  overrides = [w for w in words if w.startswith("--")]
  if overrides and any("{source_runs}" in w for w in overrides) and not source_runs:
    raise ValueError(f"plan rows name {{source_runs}}: pass --source_runs (the --out of the sweep they build on)")
  fill = {"seed": seed, "dataset": dataset, "source_runs": source_runs or "", "pairs": _CHAIN_PAIRS.get(dataset, "")}
  overrides = [w.replace("{pairs}", fill["pairs"]).format(**fill) for w in overrides]
  config_args = [w for w in words if not w.startswith("--")]
  dataset_arg = (plan.dataset_args or {}).get(dataset, dataset)
  arg = ",".join(a for a in (dataset_arg, plan.fixed, *config_args) if a)
  return [sys.executable, "launch/train.py", f"--config={plan.config}:{arg}", f"--config.seed={seed}",
          f"--workdir={workdir}", *overrides, *extra]


def collect(out: str, plan: str, datasets, seeds) -> dict:
  """{dataset: {row label: {metric: [values over seeds]}}}, the untrained row from the first row's runs."""
  rows, columns = PLANS[plan].rows, PLANS[plan].columns
  table = {}
  for dataset in datasets:
    per = {}
    for i, (label, _) in enumerate(rows):
      for seed in seeds:
        path = os.path.join(run_dir(out, dataset, i, seed), "results.json")
        if not os.path.isfile(path):
          continue
        with open(path, encoding="utf-8") as f:
          res = json.load(f)
        parts = [(label, res["last_epoch"])] + ([(UNTRAINED, res["untrained"])] if i == 0 and res.get("untrained")
                                                else [])
        for name, metrics in parts:
          for _, key in columns:
            if metrics.get(key) is not None:
              per.setdefault(name, {}).setdefault(key, []).append(float(metrics[key]))
    order = [UNTRAINED] + [label for label, _ in rows]
    table[dataset] = {name: per[name] for name in order if name in per}
  return table


def markdown(table: dict, columns=COLUMNS) -> str:
  """One markdown table per dataset: mean ± std over seeds (n seeds in the last column)."""
  out = []
  for dataset, rows in table.items():
    keys = [(h, k) for h, k in columns if any(k in r for r in rows.values())]
    out.append(f"**{dataset}**\n")
    out.append("| row | " + " | ".join(h for h, _ in keys) + " | seeds |")
    out.append("|---" * (len(keys) + 2) + "|")
    for name, metrics in rows.items():
      cells = []
      for _, k in keys:
        v = metrics.get(k)
        cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "–")
      n = max((len(v) for v in metrics.values()), default=0)
      out.append(f"| {name} | " + " | ".join(cells) + f" | {n} |")
    out.append("")
  return "\n".join(out)


def main(argv) -> int:
  del argv
  plan = PLANS[_PLAN.value]
  env = dict(os.environ)
  cache = os.path.join(_OUT.value, "jax_cache") if _CACHE.value is None else _CACHE.value
  if cache:
    env["JAX_COMPILATION_CACHE_DIR"] = cache
  todo = []
  for dataset in _DATASETS.value:
    for i, (label, args) in enumerate(plan.rows):
      if _ROWS.value is not None and str(i) not in _ROWS.value:
        continue
      for seed in _SEEDS.value:
        workdir = run_dir(_OUT.value, dataset, i, seed)
        if not os.path.isfile(os.path.join(workdir, "results.json")):
          cmd = command(plan, args, dataset, seed, workdir, _EXTRA.value, _SOURCE_RUNS.value)
          todo.append((f"{label} / {dataset} / seed {seed}", workdir, cmd))
  running = []

  def reap(block: bool) -> None:
    while running and (block or any(p.poll() is not None for p, *_ in running)):
      for entry in list(running):
        proc, name, workdir, t0, log = entry
        if proc.poll() is None:
          continue
        log.close()
        running.remove(entry)
        print(f"  {name}: rc {proc.returncode}, {time.perf_counter() - t0:.0f} s", flush=True)
        if proc.returncode:
          print(f"  failed: see {os.path.join(workdir, 'train.log')}", file=sys.stderr, flush=True)
      if block and running:
        time.sleep(1)
      if not block:
        return

  for name, workdir, cmd in todo:
    print(" ".join(cmd), flush=True)
  if _DRY.value:  # the commands only: nothing run, nothing written
    return 0
  for name, workdir, cmd in todo:
    while len(running) >= max(1, _JOBS.value):
      time.sleep(1)
      reap(block=False)
    os.makedirs(workdir, exist_ok=True)
    log = open(os.path.join(workdir, "train.log"), "w", encoding="utf-8")  # noqa: SIM115  (closed by reap)
    running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), name, workdir,
                    time.perf_counter(), log))
  reap(block=True)
  table = collect(_OUT.value, _PLAN.value, _DATASETS.value, _SEEDS.value)
  text = markdown(table, plan.columns)
  print(text)
  with open(os.path.join(_OUT.value, f"{_PLAN.value}.json"), "w", encoding="utf-8") as f:
    json.dump(table, f, indent=2)
  if _TABLE.value:
    with open(_TABLE.value, "w", encoding="utf-8") as f:
      f.write(text)
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=config_utils.parse_flags)
