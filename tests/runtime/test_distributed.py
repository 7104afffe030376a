"""Data-parallel training under torchrun (gloo, CPU) and the gradient cache.

What a user relies on: `torchrun --nproc_per_node=N` trains the same model as
one process with the same global batch (the contrastive loss sees the
negatives of every rank), builds the same stage-2 feature cache, byte for
byte, with every rank encoding its share, waits at a collective no longer
than `launcher.timeout_s`, and `pretrain.micro_batch_size` saves memory
without changing the gradient.

The two-rank tests launch this very file with torchrun: run as a script it
is a worker (`worker()`, `cache_worker()`, `timeout_worker()` at the bottom);
the training worker trains with the same `one_step` the single-process
reference uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml


from jurassiglip.runtime import entry as stage


from jurassiglip.model import checkpoint


from jurassiglip.runtime import distributed
from jurassiglip.config import load_params
from jurassiglip.data.datasets import CaptionDataset, EpochSampler
from jurassiglip.data.manifest import Manifest
from jurassiglip.data.tokenizer import load_tokenizer, tokenize
from jurassiglip.training.features import CacheMismatch, build_cache
from jurassiglip.training.seg_finetune import SegmentationObjective
from jurassiglip.model.build import build_model
from jurassiglip.model.spec import ModelSpec
from jurassiglip.model.model import JurasSigLIP
from jurassiglip.training.contrastive_pretrain import ContrastiveObjective
from jurassiglip.runtime.tracking import NullTracker
from jurassiglip.training.loop import EpochBatches, LoopSettings, fit

REPO = Path(__file__).resolve().parents[2]
# (name, stage, micro-batch per rank; 0 = the rank's whole batch)
CASES = [("contrastive", "contrastive", 0), ("contrastive_grad_cache", "contrastive", 2),
         ("segmentation", "segmentation", 0)]
CONTRASTIVE_BATCH, SEGMENTATION_BATCH = 8, 16  # global
CACHE_BATCH = 5  # uneven shares: 7 image batches and 15 caption batches of the micro set over 2 ranks
TIMEOUT_S = 5  # launcher.timeout_s of the timeout test: above the ranks' start-up skew at the rendezvous
# Set by DVC, by a team's MLflow setup or by earlier in-process stage runs; a test's own run must not see them.
FOREIGN_ENV = ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "JURASSIGLIP_PARENT_RUN_ID", "JURASSIGLIP_PARAMS")


class Rows(NullTracker):
    """Tracker stand-in that keeps the per-epoch rows fit reports."""

    def __init__(self):
        self.rows = []

    def log_epoch(self, plot, epoch, values):
        self.rows.append(values)


def assert_close(got: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """Equal up to float32 summation order: the largest difference within `rel` of the largest entry."""
    error, scale = float((got - expected).abs().max()), float(expected.abs().max())
    assert error <= rel * scale, f"{what}: differs by {error:.2e} (largest entry {scale:.2e})"


def load_setup(data_dir: Path, params_path: Path):
    params = load_params(params_path)
    manifest = Manifest.load(data_dir / "manifest")
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    ids, mask = tokenize(tokenizer, manifest.samples["sentence"].tolist(), params.model.arch.text_max_len)
    return params, manifest, ids, mask, ModelSpec.from_params(params, tokenizer)


def perturbed_model(spec: dict) -> JurasSigLIP:
    """A tiny model whose LoRA B matrices are off zero, so gradients reach every adapter matrix."""
    torch.manual_seed(0)
    model = build_model(spec)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    return model


def distinct_image_captions(manifest: Manifest, n: int) -> np.ndarray:
    """The first `n` targeted train captions of `n` different images."""
    rows = manifest.samples[(manifest.samples["split"] == "train") & ~manifest.samples["no_target"]]
    return rows.drop_duplicates("image_index")["sample_id"].to_numpy()[:n]


def one_step(stage: str, micro: int, data_dir: Path, params_path: Path, ckpt_dir: Path) -> dict:
    """fit() for one epoch of one global batch, on this process's share; what a rank ends up with."""
    params, manifest, ids, mask, spec = load_setup(data_dir, params_path)
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    model = perturbed_model(spec)
    rank, world = distributed.rank(), distributed.world_size()
    if stage == "contrastive":
        chosen = distinct_image_captions(manifest, 2 * CONTRASTIVE_BATCH)
        dataset = CaptionDataset(manifest, ids, mask, with_target=False)
        global_batch = CONTRASTIVE_BATCH
    else:
        train = manifest.samples.loc[manifest.samples["split"] == "train", "sample_id"].to_numpy()
        chosen = train[:2 * SEGMENTATION_BATCH]
        dataset = CaptionDataset(manifest, ids, mask, with_target=True)
        global_batch = SEGMENTATION_BATCH

    def sampler(sample_ids):  # this rank's share, as the training recipes shard
        return EpochSampler(sample_ids, None, seed=0, shuffle=False, rank=rank, world_size=world)

    batches = EpochBatches(dataset, sampler(chosen[:global_batch]), sampler(chosen[global_batch:]),
                           batch_size=global_batch // world, num_workers=0)
    if stage == "contrastive":
        objective = ContrastiveObjective(model, batches, loss="clip", micro_batch=micro or CONTRASTIVE_BATCH // world,
                                         spec=spec, tokenizer=tokenizer)
    else:
        objective = SegmentationObjective(model, batches, cfg=params.finetune, spec=spec, tokenizer=tokenizer)
    tracker = Rows()
    result = fit(objective, LoopSettings(epochs=1, patience=1, log_every=1, max_val_batches=0, lr=1e-3,
                                         weight_decay=0.01),
                 ckpt_dir=ckpt_dir, run_fingerprint=stage, tracker=tracker)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return {"start_val_loss": result.start_val_loss, "val_loss": result.best_val_loss, "rows": tracker.rows,
            "weights": {n: p.detach().clone() for n, p in named}, "grads": {n: p.grad.clone() for n, p in named}}


@pytest.fixture
def params_path(micro_params, tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(micro_params))
    return path


def torchrun(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 ...` (torch.distributed.run is torchrun's entry point)."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    for var in FOREIGN_ENV:
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 or not check, f"torchrun failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


@pytest.mark.distributed
def test_two_ranks_take_the_same_step_as_one_process(micro_data, params_path, tmp_path):
    """Loss, gradients and updated weights of one step: 2 gloo ranks x half batch == 1 process x whole batch.

    For the contrastive loss this needs the cross-rank negatives and the right
    gradient scaling (gathered features); with a gradient cache (micro-batch 2
    of 4 per rank) also DDP's no_sync; for stage 2 the DDP-wrapped head.
    Validation losses are averaged over ranks, and only rank 0 checkpoints.
    """
    torchrun(__file__, str(micro_data), str(params_path), str(tmp_path), cwd=REPO)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    single = {stage: one_step(stage, 0, micro_data, params_path, tmp_path / "single" / stage)
              for stage in ("contrastive", "segmentation")}
    for name, stage, _ in CASES:
        expected = single[stage]
        for rank, results in enumerate(ranks):
            got = results[name]
            where = f"{name}, rank {rank}"
            assert got["start_val_loss"] == pytest.approx(expected["start_val_loss"], rel=1e-5), where
            assert got["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5), where
            assert got["val_loss"] != pytest.approx(got["start_val_loss"], rel=1e-6), where  # the step did something
            for param, grad in expected["grads"].items():
                assert grad.abs().max() > 0, f"{where}: no gradient reached {param}"
                assert_close(got["grads"][param], grad, 1e-5, f"{where}: gradient of {param}")
                assert_close(got["weights"][param], expected["weights"][param], 1e-5, f"{where}: {param} stepped")
        assert ranks[0][name]["rows"][0]["train_loss"] == pytest.approx(expected["rows"][0]["train_loss"], rel=1e-5)
        assert ranks[1][name]["rows"] == []  # rank 1 reports nothing...
        written = sorted(p.name for p in (tmp_path / "ckpt" / name / "rank0").iterdir())
        assert written == [checkpoint.BEST, checkpoint.LATEST]
        assert not (tmp_path / "ckpt" / name / "rank1").exists()  # ...and writes no checkpoint


def cache_ids(manifest: Manifest) -> np.ndarray:
    """What stage 2 caches: the train and val captions."""
    return manifest.samples.loc[manifest.samples["split"].isin(["train", "val"]), "sample_id"].to_numpy().copy()


def count_images(model: JurasSigLIP) -> list[int]:
    """Batch sizes seen by the vision tower (a forward hook on the real module)."""
    seen = []
    model.vision.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    return seen


@pytest.mark.distributed
def test_two_ranks_build_the_single_process_cache_and_a_mismatch_stops_a_rank(micro_data, params_path, tmp_path):
    """2 gloo ranks, each encoding its share, write the bytes one process writes; they reuse it together;
    a rank whose fingerprint differs from the folder's (other code on its node) stops, naming both."""
    torchrun(__file__, "cache", str(micro_data), str(params_path), str(tmp_path), cwd=REPO)
    ranks = [json.loads((tmp_path / f"cache_rank{r}.json").read_text()) for r in (0, 1)]

    _, manifest, ids, mask, spec = load_setup(micro_data, params_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's ranks (OMP_NUM_THREADS=1): a sum split over threads rounds otherwise
    try:
        build_cache(perturbed_model(spec), manifest, ids, mask, cache_ids(manifest), tmp_path / "one",
                    batch_size=CACHE_BATCH, fingerprint="same")
    finally:
        torch.set_num_threads(threads)
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == ["index.npz", "meta.json", "patches.npy", "text.npy", "text_mask.npy"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == files
    for name in files:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    n_images = manifest.samples["image_index"].to_numpy()[cache_ids(manifest)]
    assert ranks[0]["built"] + ranks[1]["built"] == len(np.unique(n_images))  # one pass per image in all...
    assert ranks[0]["built"] > 0 and ranks[1]["built"] > 0  # ...shared out
    assert ranks[0]["reused"] == ranks[1]["reused"] == 0  # same fingerprint: nobody encodes again
    assert ranks[0]["error"] is None
    folder = tmp_path / "mismatch"
    assert ranks[1]["error"] == (
        f"feature cache {folder}: rank 1 expects fingerprint rank1 but finds rank0 there after the build; all "
        f"ranks must run the same code on the same data/ folder (a filesystem every node shares)")


@pytest.mark.distributed
def test_launcher_timeout_bounds_the_wait_at_a_collective(micro_params, tmp_path):
    """launcher.timeout_s reaches the process group a stage joins: a barrier that one rank skips fails on
    the other after about timeout_s, not torch's 30-minute default."""
    project = tmp_path / "project"
    project.mkdir()
    params = {**micro_params, "launcher": {**micro_params["launcher"], "timeout_s": TIMEOUT_S}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    (project / "dvc.yaml").write_text("stages: {}\n")
    torchrun(__file__, "timeout", str(project), str(tmp_path), cwd=REPO, check=False)
    outcome = json.loads((tmp_path / "rank0.json").read_text())
    assert outcome["error"] and "Timed out" in outcome["error"], "rank 1 never came: the barrier should time out"
    assert TIMEOUT_S - 0.5 <= outcome["seconds"] <= TIMEOUT_S + 15, outcome


@pytest.mark.distributed
def test_a_config_error_under_torchrun_exits_2_on_every_rank_and_is_recorded_once(micro_params, tmp_path,
                                                                                    monkeypatch):
    """Params are read before the process group is joined (its timeout is a param): both ranks stop with
    exit code 2, and the FAILED MLflow run is rank 0's alone, recorded while rank 1 waits for it (torchrun
    would kill rank 0 as soon as rank 1 exits)."""
    from mlflow.tracking import MlflowClient

    from jurassiglip.runtime.tracking import tracking_uri

    params = {**micro_params, "finetune": {**micro_params["finetune"], "batch_size": 15}}  # odd: not for 2 ranks
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    out = torchrun("-m", "stages.seg_finetune", cwd=tmp_path, check=False)
    assert out.returncode != 0 and "exitcode  : 2" in out.stderr and "exitcode  : 143" not in out.stderr
    assert out.stderr.count("finetune.batch_size = 15 must be divisible by the number of ranks (2)") == 2
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # an earlier in-process run may have set it
    client = MlflowClient(tracking_uri(tmp_path))
    experiment = client.get_experiment_by_name(micro_params["tracking"]["experiment"])
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'seg_finetune'")
    assert [r.info.status for r in runs] == ["FAILED"]


@pytest.mark.parametrize("loss", ["clip", "sigmoid"])
def test_gradient_cache_gives_the_whole_batch_gradient(micro_data, params_path, loss):
    """micro_batch 4 of a batch of 16, in train mode (DINOv3 jitters its RoPE positions), equals the whole batch."""
    _, manifest, ids, mask, spec = load_setup(micro_data, params_path)
    model = perturbed_model(spec)
    dataset = CaptionDataset(manifest, ids, mask, with_target=False)
    sampler = EpochSampler(distinct_image_captions(manifest, 16), None, seed=0, shuffle=False)
    batches = EpochBatches(dataset, sampler, sampler, batch_size=16, num_workers=0)
    objectives = {micro: ContrastiveObjective(model, batches, loss=loss, micro_batch=micro, spec=spec, tokenizer=None)
                  for micro in (16, 4)}  # the plain step and the gradient cache
    model.train()
    batch = next(iter(batches.train(1)))
    torch.manual_seed(1)
    jittered = model.contrastive_features(batch["image"][:2], batch["input_ids"][:2], batch["attention_mask"][:2])
    torch.manual_seed(2)
    other = model.contrastive_features(batch["image"][:2], batch["input_ids"][:2], batch["attention_mask"][:2])
    assert not torch.allclose(jittered[0], other[0])  # so replaying the RNG state matters

    def step(micro):
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        value = objectives[micro].step(batch)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return value, grads, torch.get_rng_state()

    whole_loss, whole, whole_rng = step(16)
    cached_loss, cached, cached_rng = step(4)
    assert float(cached_loss) == pytest.approx(float(whole_loss), rel=1e-6)
    groups = {
        "vision LoRA": [n for n in whole if n.startswith("vision.") and "lora_" in n],
        "text LoRA": [n for n in whole if n.startswith("text.") and "lora_" in n],
        "text projection": ["text.projection.weight"],
        "logit scale": ["logit_scale_raw"] + (["logit_bias"] if loss == "sigmoid" else []),
    }
    assert sorted(n for names in groups.values() for n in names) == sorted(whole)
    for group, names in groups.items():
        assert names, group
        for name in names:
            assert whole[name].abs().max() > 0, f"{group}: no gradient reached {name}"
            assert_close(cached[name], whole[name], 1e-5, f"{group}: gradient of {name}")
    assert torch.equal(cached_rng, whole_rng)  # the run continues as after a whole-batch step


def test_rank_shards_of_a_global_batch_are_the_single_process_batch():
    """Batch k of every rank together = batch k of one process, for any epoch; ranks never share a sample."""
    ids, images = np.arange(103) * 3, np.arange(103) // 2  # two captions per image
    world, per_rank = 4, 3
    for one_per_image in (False, True):
        single = EpochSampler(ids, images, seed=5, one_per_image=one_per_image)
        shards = [EpochSampler(ids, images, seed=5, one_per_image=one_per_image, rank=r, world_size=world)
                  for r in range(world)]
        for sampler in (single, *shards):
            sampler.set_epoch(7)
        whole = list(single)
        parts = [list(s) for s in shards]
        assert [len(p) for p in parts] == [len(s) for s in shards] == [len(whole) // world] * world
        assert len(set().union(*parts)) == sum(map(len, parts))
        for k in range(len(parts[0]) // per_rank):
            together = sorted(i for p in parts for i in p[k * per_rank:(k + 1) * per_rank])
            assert together == sorted(whole[k * world * per_rank:(k + 1) * world * per_rank])


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_runs_both_training_stages(micro_data, micro_params, tmp_path, monkeypatch):
    """The real entry points under torchrun: one MLflow run and one set of files per stage, from rank 0,
    the feature cache built once, and stage 1 ending where one process ends."""
    from mlflow.tracking import MlflowClient

    from jurassiglip.runtime.tracking import tracking_uri

    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: stages run in this process by earlier tests leave it set.
    for var in FOREIGN_ENV:
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(micro_params))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "data" / "build_manifest").mkdir(parents=True)
    for name in ("manifest", "tokenizer"):
        (tmp_path / "data" / "build_manifest" / name).symlink_to(micro_data / name)
    for stage in ("contrastive_pretrain", "seg_finetune"):
        torchrun("-m", f"stages.{stage}", cwd=tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # an earlier in-process run may have set it
    client = MlflowClient(tracking_uri(tmp_path))
    experiment = client.get_experiment_by_name(micro_params["tracking"]["experiment"])
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.stage != ''")
    assert sorted(r.data.tags["stage"] for r in runs) == ["contrastive_pretrain", "seg_finetune"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert json.loads((tmp_path / "data/seg_finetune/features/meta.json").read_text())["vision_passes"] > 0
    distributed_metrics = json.loads((tmp_path / "data/contrastive_pretrain/metrics.json").read_text())

    # The same stage in one process (in this process), from the same manifest.
    single = tmp_path / "single"
    (single / "data").mkdir(parents=True)
    (single / "data" / "build_manifest").symlink_to(tmp_path / "data" / "build_manifest")
    for name in ("params.yaml", "dvc.yaml"):
        (single / name).write_text((tmp_path / name).read_text())
    monkeypatch.chdir(single)
    from stages import contrastive_pretrain
    contrastive_pretrain.main()
    single_metrics = json.loads((single / "data/contrastive_pretrain/metrics.json").read_text())
    assert distributed_metrics["epochs_run"] == single_metrics["epochs_run"]
    for key in ("start_val_loss", "best_val_loss"):
        assert distributed_metrics[key] == pytest.approx(single_metrics[key], rel=1e-5), key


def worker(data_dir: Path, params_path: Path, out_dir: Path) -> None:
    """One rank of the two-rank test: every case, results to out_dir/rank<r>.pt."""
    with distributed.process_group():
        rank = distributed.rank()
        results = {name: one_step(stage, micro, data_dir, params_path, out_dir / "ckpt" / name / f"rank{rank}")
                   for name, stage, micro in CASES}
        torch.save(results, out_dir / f"rank{rank}.pt")


def cache_worker(data_dir: Path, params_path: Path, out_dir: Path) -> None:
    """One rank of the cache test: build, reuse, then a fingerprint that differs by rank; to cache_rank<r>.json."""
    with distributed.process_group(timeout_s=120):
        rank = distributed.rank()
        _, manifest, ids, mask, spec = load_setup(data_dir, params_path)
        model = perturbed_model(spec)
        seen = count_images(model)
        build_cache(model, manifest, ids, mask, cache_ids(manifest), out_dir / "two", batch_size=CACHE_BATCH,
                    fingerprint="same")
        built = sum(seen)
        build_cache(model, manifest, ids, mask, cache_ids(manifest), out_dir / "two", batch_size=CACHE_BATCH,
                    fingerprint="same")
        reused = sum(seen) - built
        error = None
        try:
            build_cache(model, manifest, ids, mask, cache_ids(manifest), out_dir / "mismatch",
                        batch_size=CACHE_BATCH, fingerprint=f"rank{rank}")
        except CacheMismatch as err:
            error = str(err)
        result = {"built": built, "reused": reused, "error": error}
        (out_dir / f"cache_rank{rank}.json").write_text(json.dumps(result))


def timeout_worker(project: Path, out_dir: Path) -> None:
    """One rank of the timeout test, through a stage's entry point: rank 0 waits at a barrier rank 1 skips."""
    os.chdir(project)
    done = out_dir / "rank0.json"

    def run(params, tracker):
        if distributed.rank() == 1:  # stays away from the barrier until rank 0 is through with it (or 2 min)
            deadline = time.monotonic() + 120
            while not done.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            return
        start = time.monotonic()
        try:
            distributed.barrier()
            error = None
        except RuntimeError as err:
            error = f"{type(err).__name__}: {err}"
        done.write_text(json.dumps({"seconds": time.monotonic() - start, "error": error}))

    stage.entry("seg_finetune", run)()


if __name__ == "__main__":
    if sys.argv[1] == "cache":
        cache_worker(*map(Path, sys.argv[2:5]))
    elif sys.argv[1] == "timeout":
        timeout_worker(*map(Path, sys.argv[2:4]))
    else:
        worker(*map(Path, sys.argv[1:4]))
