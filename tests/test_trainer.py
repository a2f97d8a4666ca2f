"""The DeepSpeed trainer on CPU: exact parity with plain PyTorch, one graph at a time, two real
ranks, exact resume after a kill, crash-safe checkpoints, and config contradictions caught early."""
import json
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from conftest import launch_args
from gill.training import distributed
from gill.training.checkpoint import MARKER, CheckpointManager
from gill.data.collate import collate_layout
from gill.data.synthetic import SyntheticLayoutDataset
from gill.training.ds_config import ConfigError, build_ds_config
from gill.models.model import MODES, GillModel
from gill.training.recipe import build_engine
from gill.models.stack import load_stack
from gill.training.recipe import optimizer_step

ROOT = Path(__file__).resolve().parent.parent


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def micro_batches(n, size, seed=5):
    ds = SyntheticLayoutDataset(n * size, resolution=64, seed=seed)
    return [collate_layout([ds[i * size + j] for j in range(size)]) for i in range(n)]


def train_cmd(stack_dir, out, *extra, launcher=(sys.executable,), validate=False):
    val = ["train.val_images=1", "train.val_image_steps=2", "train.val_batches=1"] if validate else ["data.val=null"]
    return [*launcher, str(ROOT / "train_ds.py"), f"model.pretrained_path={stack_dir}",
            f"train.output_dir={out}", *val, *extra]


def deepspeed_2():
    """The `deepspeed` launcher of this interpreter (venv on PATH or not), 2 ranks, a free port."""
    return (sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
            "--master_port", str(distributed.free_port()))


# ---- parity ---------------------------------------------------------------------------------------


def named_trainables(model, fn) -> dict:
    """``{name: fn(param)}`` for the trainables under their original names, flattened or not."""
    out = {n: fn(p) for n, p in model.named_parameters() if p.requires_grad}
    flat = model.adapter.flat_params
    if flat is not None:
        out.update({f"adapter.{k}": v for k, v in flat.split(out.pop("adapter.flat")).items()})
    return out


# The 24 GB recipe's optimizer (launch/train_24gb.sh): ZeRO-2 keeping the state with the model, torch's fused AdamW.
RECIPE_24GB = ("deepspeed=zero2", "+deepspeed.overrides.optimizer.params.torch_adam=true",
               "+deepspeed.overrides.optimizer.params.fused=true")


@pytest.mark.slow  # DeepSpeed ZeRO-2 engines vs plain PyTorch: ~1 min each on a loaded 2-core box
@pytest.mark.parametrize("recipe,flat", [("offload", True), ("offload", False), ("24gb", True)],
                         ids=["offload-flat", "offload-per-tensor", "24gb-recipe"])
def test_zero2_step_matches_plain_pytorch_exactly(tiny_stack_dir, recipe, flat):
    """3 modes x grad_accum 2, per-mode backward: the first update is compared element-wise; the
    gradients of a second step prove nothing leaks across steps. The default CPU-offloaded optimizer
    with the adapter flattened into one tensor and per tensor (where the DeepSpeed work-arounds in
    gill/training/ds_exactness.py matter), and the 24 GB recipe's optimizer (no offload, torch AdamW)."""
    cfg = compose_cfg(
        f"model.pretrained_path={tiny_stack_dir}", "train.micro_batch_size=2", "train.grad_accum=2",
        "train.lr=0.01", "train.grad_clip=1.0", "train.mode_weights.retrieval=0.5", "model.layout_dropout=0.5",
        f"train.flat_params={flat}", *(RECIPE_24GB if recipe == "24gb" else ()),
    )
    ds_config = build_ds_config(cfg, 1, on_gpu=False)
    assert ds_config["zero_optimization"]["stage"] == 2
    offload = ds_config["zero_optimization"].get("offload_optimizer", {}).get("device")
    assert offload == ("cpu" if recipe == "offload" else None), ds_config
    assert ds_config["gradient_accumulation_steps"] == 6
    distributed.init(torch.device("cpu"))
    engine = build_engine(cfg, ds_config, torch.device("cpu"), 10)
    assert type(engine.optimizer).__name__ == "DeepSpeedZeroOptimizer"
    assert len(engine.optimizer.bit16_groups[0]) == (1 if flat else len(engine.module.trainable_parameters()))
    inner = engine.optimizer.optimizer
    if recipe == "24gb":
        assert type(inner) is torch.optim.AdamW and inner.defaults["fused"] is True, inner
    else:
        assert type(inner).__name__ == "DeepSpeedCPUAdam", inner

    stack = load_stack(cfg.model, device="cpu", dtype=torch.float32)
    ref = GillModel(stack, cfg.model)
    ref.adapter.load_state_dict(engine.module.adapter.state_dict())
    params = ref.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    modes, weights = list(cfg.train.modes), dict(cfg.train.mode_weights)

    for step in range(2):
        batches = micro_batches(2, 2, seed=10 + step)
        engine.module.seed(step)
        ref.seed(step)
        before = {n: p.detach().clone() for n, p in zip(names, params)}

        ds_grads = {}

        def probe(eng):
            from deepspeed.utils import safe_get_full_grad

            ds_grads.update(named_trainables(eng.module, lambda p: safe_get_full_grad(p).detach().clone()))

        optimizer_step(engine, batches, modes, weights, before_update=probe)

        opt.zero_grad(set_to_none=True)
        for b in batches:
            for mode in modes:
                (ref(b, mode)["loss"] * weights[mode] / (len(modes) * len(batches))).backward()
        ref_grads = {n: p.grad.detach().clone() if p.grad is not None else None for n, p in zip(names, params)}
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ds_after = named_trainables(engine.module, lambda p: p.detach().clone())

        for n, p in zip(names, params):
            g_ref, g_ds = ref_grads[n], ds_grads[n]
            if g_ref is None:
                assert g_ds is None or not g_ds.any(), n
            else:
                # fp32 sums in another order: ~1e-5 on gradients whose terms cancel (the gates)
                err = (g_ds - g_ref).abs().max() / g_ref.abs().max().clamp(min=1e-30)
                assert err <= 5e-5, (step, n, float(err))
            if step == 0:
                # From step 2 on, Adam's second moment turns gradients that are pure rounding
                # noise (e.g. attention key biases, exactly 0 in exact arithmetic) into +-lr
                # updates of random sign, so only the first update is compared element-wise.
                # 1e-5 of the update, plus two fp32 ulps of the parameter itself (a weight near 1.0,
                # e.g. a norm's, cannot be represented closer than 1.2e-7 whatever the update).
                update = p.detach() - before[n]
                diff = (ds_after[n] - p.detach()).abs().max()
                tol = 1e-5 * update.abs().max() + 2 * torch.finfo(torch.float32).eps * p.detach().abs().max()
                assert diff <= tol, (step, n, float(diff), float(tol))
        # Parameters only one mode touches did move (and equally in both).
        for n in ("adapter.visual_prefix.weight", "adapter.text_proj.weight", "adapter.mapper.proj_in.weight"):
            assert not torch.equal(dict(zip(names, params))[n], before[n]), n
    # After step 1 opened the gates, step 2 trained every spatial layer's inner weights too.
    assert ref_grads["adapter.spatial.layers.0.proj_in.weight"].abs().sum() > 0


# ---- one graph at a time --------------------------------------------------------------------------


class SavedTensorMeter:
    """Peak bytes held by autograd's saved tensors (alive until their graph is freed)."""

    def __init__(self):
        self.live = self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda packed: packed[1])

    def _release(self, n):
        self.live -= n

    def _pack(self, t):
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)

        class Token:
            pass

        token = Token()
        weakref.finalize(token, self._release, n)
        return token, t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def test_per_mode_backward_keeps_one_graph_alive(tiny_stack_dir):
    cfg = compose_cfg(f"model.pretrained_path={tiny_stack_dir}", "train.micro_batch_size=4")
    distributed.init(torch.device("cpu"))
    engine = build_engine(cfg, build_ds_config(cfg, 1, on_gpu=False), torch.device("cpu"), 10)
    batch = micro_batches(1, 4)[0]
    plain = GillModel(load_stack(cfg.model, device="cpu", dtype=torch.float32), cfg.model)

    singles = {}
    for mode in MODES:
        plain.seed(0)
        with SavedTensorMeter() as m:
            plain(batch, mode)["loss"].backward()
        singles[mode] = m.peak
    plain.seed(0)
    with SavedTensorMeter() as summed:  # the seed's original code: one backward of the sum
        sum(plain(batch, mode)["loss"] for mode in MODES).backward()
    engine.module.seed(0)
    with SavedTensorMeter() as per_mode:  # the trainer's step, through DeepSpeed
        optimizer_step(engine, [batch], list(MODES), {})

    assert per_mode.peak <= max(singles.values()) * 1.05, (per_mode.peak, singles)
    assert summed.peak >= sum(singles.values()) * 0.95, (summed.peak, singles)
    # What per-mode backward saves: every graph but the largest (generation dominates at tiny scale).
    others = sum(singles.values()) - max(singles.values())
    assert summed.peak - per_mode.peak >= 0.9 * others > 0, (summed.peak, per_mode.peak, singles)


# ---- config contradictions -------------------------------------------------------------------------


def test_contradictions_are_refused_naming_both_values():
    cfg = compose_cfg("+deepspeed.overrides.train_micro_batch_size_per_gpu=4", "train.micro_batch_size=2")
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu=4.*2"):
        build_ds_config(cfg, 1, on_gpu=False)
    cfg = compose_cfg("+deepspeed.overrides.gradient_accumulation_steps=2", "train.grad_accum=1")
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=2.*3"):  # 3 modes x 1
        build_ds_config(cfg, 1, on_gpu=False)
    cfg = compose_cfg("+deepspeed.overrides.gradient_clipping=0.5", "train.grad_clip=1.0")
    with pytest.raises(ConfigError, match="gradient_clipping"):
        build_ds_config(cfg, 1, on_gpu=False)
    cfg = compose_cfg("train.modes=[captioning,painting]")
    with pytest.raises(ConfigError, match="painting"):
        build_ds_config(cfg, 1, on_gpu=False)


@pytest.mark.slow  # train_ds.py in a child process
def test_contradiction_fails_before_any_model_loads(tmp_path, child_env):
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_ds.py"), f"train.output_dir={tmp_path}",
         "+deepspeed.overrides.train_batch_size=999", "model.pretrained_path=/nonexistent"],
        capture_output=True, text=True, env=child_env, timeout=120,
    )
    assert proc.returncode != 0
    assert "train_batch_size=999" in proc.stderr and "6" in proc.stderr
    assert "Loading weights" not in proc.stderr + proc.stdout
    assert not (tmp_path / "checkpoints").exists()
    assert time.time() - t0 < 60


# ---- two ranks --------------------------------------------------------------------------------------


def assert_split_run_equals_whole(run, whole: Path, split: Path) -> None:
    """``run`` to step 2 into ``split``, resume there to step 4: the adapter equals the 4-step run in ``whole``."""
    run(split, "train.max_steps=2")
    run(split, "train.max_steps=4", "train.resume=auto")
    a, b = load_file(whole / "adapter.safetensors"), load_file(split / "adapter.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow  # train_ds.py on 2 ranks in child processes
def test_two_rank_run_of_the_24gb_recipe_on_cpu(tiny_stack_dir, tmp_path, child_env):
    """What launch/train_3gpu.sh hands `deepspeed` (recorded by a stub), on 2 CPU ranks at the tiny size: ZeRO-2
    with the optimizer state kept with the model (no offload) trains, each rank holding half of the fp32 master
    weights and of Adam's moments, the replicas stay identical, and a run split by a resume equals the whole."""
    recorded = launch_args(tmp_path, script="train_3gpu.sh")
    assert recorded[0] == "--num_gpus=3" and recorded[1] == "train_ds.py"
    recipe = [a for a in recorded[2:] if not a.startswith(("model=", "train.max_steps=", "train.save_every="))]

    def run(out, *extra):
        proc = subprocess.run(
            train_cmd(tiny_stack_dir, out, "model=tiny", *recipe, "train.save_every=2", *extra, launcher=deepspeed_2()),
            capture_output=True, text=True, env=child_env, timeout=300, cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "run"
    run(out, "train.max_steps=4")
    cfg = (out / "config.yaml").read_text()
    assert "torch_adam: true" in cfg and "fused: true" in cfg, cfg
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["split"] == "final" and final["step"] == 4 and final["replicas_identical"] == 1.0
    full = sum(t.numel() for t in load_file(out / "adapter.safetensors").values()) * 4 / 2**30
    for rank_report in final["per_rank"]:
        detail = rank_report["optimizer_state_detail_gib"]
        assert full / 2 <= detail["master"]["cpu"] <= full / 2 * 1.01, (detail, full)
        # torch's AdamW also keeps its step count as a one-element tensor beside the two moments
        assert detail["moments"]["cpu"] == pytest.approx(2 * detail["master"]["cpu"], rel=1e-4), detail

    assert_split_run_equals_whole(run, out, tmp_path / "split")


@pytest.mark.slow  # train_ds.py in a child process
def test_two_rank_deepspeed_run_on_cpu(tiny_stack_dir, tmp_path, child_env):
    """Two real ranks: negatives from both, validation on rank 0 without a hang, identical replicas,
    one run folder; then the same run split by a resume (each rank its own random stream) is exact."""
    def run(out, *extra):
        launcher = deepspeed_2()
        proc = subprocess.run(
            train_cmd(tiny_stack_dir, out, "train.save_every=2", "train.seed=1", "train.mode_weights.captioning=0.5",
                      *extra, launcher=launcher, validate=True),
            capture_output=True, text=True, env=child_env, timeout=300, cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        # DeepSpeed's CPU all-reduce buffers (66 MB per rank in /dev/shm) are removed, not left behind
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{launcher[-1]}_*"))

    out = tmp_path / "run"
    run(out, "train.max_steps=4")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 4
    # Retrieval negatives: 2 ranks x 2 samples -> 3 negatives per query (1 would mean local only).
    assert all(r["retrieval/negatives"] == 3 for r in train)
    assert [r["step"] for r in records if r["split"] == "val"] == [4]
    final = [r for r in records if r["split"] == "final"][-1]
    assert final["replicas_identical"] == 1.0
    assert (out / "adapter.safetensors").exists() and (out / "checkpoints" / "step_00000004" / MARKER).exists()
    # ZeRO-2 in numbers: each rank keeps half of the fp32 master weights, their gradients and Adam's
    # two moments, on the CPU (offloaded optimizer); never a full copy.
    n_trainable = sum(t.numel() for t in load_file(out / "adapter.safetensors").values())
    full = n_trainable * 4 / 2**30
    assert len(final["per_rank"]) == 2
    for rank_report in final["per_rank"]:
        detail = rank_report["optimizer_state_detail_gib"]
        assert set(rank_report["optimizer_state_gib"]) == {"cpu"}
        assert full / 2 <= detail["master"]["cpu"] <= full / 2 * 1.01, (detail, full)
        assert detail["grads"]["cpu"] == detail["master"]["cpu"]
        assert detail["moments"]["cpu"] == 2 * detail["master"]["cpu"]
    # One run folder, written by rank 0 only: no stray per-rank folders, one .hydra.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert (out / ".hydra").is_dir()

    split = tmp_path / "split"
    assert_split_run_equals_whole(run, out, split)

    # Resuming with another world size would silently change the data order: refused.
    proc = subprocess.run(train_cmd(tiny_stack_dir, split, "train.max_steps=6", "train.resume=auto"),
                          capture_output=True, text=True, env=child_env, timeout=300)
    assert proc.returncode != 0 and "world_size=2" in proc.stderr


# ---- resume ----------------------------------------------------------------------------------------


@pytest.mark.slow  # train_ds.py in a child process
def test_resume_after_kill_is_exact(tiny_stack_dir, tmp_path, child_env):
    common = ("train.max_steps=6", "train.save_every=2", "train.keep_last=5", "train.seed=3")
    straight = tmp_path / "straight"
    subprocess.run(train_cmd(tiny_stack_dir, straight, *common), check=True, env=child_env, timeout=600,
                   capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(tiny_stack_dir, killed, *common), env=child_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_00000002" / MARKER).exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no chance to save
    proc.wait()
    done = CheckpointManager(killed).complete()
    assert done and int(done[-1].name.split("_")[1]) < 6, "the kill came too late to test resume"
    # As if the attempt had logged one more step before the kill (it may or may not have, by timing).
    with open(killed / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"split": "train", "step": int(done[-1].name.split("_")[1]) + 1}) + "\n")

    subprocess.run(train_cmd(tiny_stack_dir, killed, *common, "train.resume=auto"), check=True, env=child_env,
                   timeout=600, capture_output=True)
    a = load_file(straight / "adapter.safetensors")
    b = load_file(killed / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The log holds each step once: records the killed attempt wrote past its checkpoint were dropped.
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]

    # A fresh run (no train.resume) into a folder that holds a run is refused: it would mix the two.
    config = (killed / "config.yaml").read_text()
    proc = subprocess.run(train_cmd(tiny_stack_dir, killed, *common, "train.seed=4"), env=child_env, timeout=600,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "already holds a run" in proc.stderr
    assert (killed / "config.yaml").read_text() == config
    for k, t in load_file(killed / "adapter.safetensors").items():
        assert torch.equal(t, b[k]), k


@pytest.mark.slow  # train_ds.py in a child process
def test_sigterm_finishes_the_step_saves_and_exits_zero(tiny_stack_dir, tmp_path, child_env):
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(tiny_stack_dir, out, "train.max_steps=1000", "train.save_every=0"),
                            env=child_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    latest = CheckpointManager(out).latest()
    assert latest is not None and (out / "adapter.safetensors").exists()
    assert 1 <= int(latest.name.split("_")[1]) < 1000


@pytest.mark.slow  # train_ds.py in a child process
def test_time_limit_finishes_the_step_saves_and_exits_zero(tiny_stack_dir, tmp_path, child_env):
    out = tmp_path / "run"
    proc = subprocess.run(train_cmd(tiny_stack_dir, out, "train.max_steps=1000", "train.save_every=0",
                                    "train.time_limit_min=0.0001"),
                          capture_output=True, text=True, env=child_env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopped at train.time_limit_min at step 1" in proc.stdout + proc.stderr
    assert CheckpointManager(out).latest().name == "step_00000001" and (out / "adapter.safetensors").exists()


@pytest.mark.slow  # train_ds.py in a child process
def test_profile_writes_tables_and_trace_of_the_chosen_steps(tiny_stack_dir, tmp_path, child_env):
    out = tmp_path / "run"
    proc = subprocess.run(train_cmd(tiny_stack_dir, out, "train.max_steps=3", "train.save_every=0",
                                    "train.profile.first_step=2", "train.profile.steps=1"),
                          capture_output=True, text=True, env=child_env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (out / "profile" / "rank0.txt").read_text()
    assert "optimizer steps 2-2" in table and "by self CPU time" in table and "aten::" in table
    assert json.loads((out / "profile" / "rank0.trace.json").read_text())["traceEvents"]
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][:3]
    assert [r.get("profiled", 0.0) for r in train] == [0.0, 1.0, 0.0]


# ---- crash-safe checkpoints -------------------------------------------------------------------------


def test_crash_during_save_leaves_previous_checkpoint_loadable(tiny_stack_dir, tmp_path):
    cfg = compose_cfg(f"model.pretrained_path={tiny_stack_dir}")
    distributed.init(torch.device("cpu"))
    engine = build_engine(cfg, build_ds_config(cfg, 1, on_gpu=False), torch.device("cpu"), 10)
    ckpt = CheckpointManager(tmp_path, keep_last=2)
    optimizer_step(engine, micro_batches(1, 2), list(MODES), {})
    first = ckpt.save(engine, 1, {"step": 1})
    saved = {k: v.clone() for k, v in engine.module.adapter.state_dict().items()}

    optimizer_step(engine, micro_batches(1, 2, seed=9), list(MODES), {})
    real_save = engine.save_checkpoint

    def crashing_save(save_dir, tag=None, **kw):
        real_save(save_dir, tag=tag, **kw)  # files are on disk...
        raise KeyboardInterrupt("killed mid-save")  # ...but the save never completes

    engine.save_checkpoint = crashing_save
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(engine, 2, {"step": 2})
    engine.save_checkpoint = real_save
    assert ckpt.resolve("auto") == first
    state = CheckpointManager.load(engine, ckpt.resolve("auto"))
    assert state["step"] == 1
    for k, v in engine.module.adapter.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # The next successful save cleans the debris and rotation keeps the last two.
    for step in (3, 4, 5):
        ckpt.save(engine, step, {"step": step})
    assert [p.name for p in ckpt.complete()] == ["step_00000004", "step_00000005"]
    assert not list((tmp_path / "checkpoints" / ".tmp").glob("step_*"))


def test_nan_steps_are_skipped_then_the_run_stops(tiny_stack_dir, tmp_path, monkeypatch):
    from gill.models import modes as mode_fns
    from gill.training.trainer import NonFiniteLossError, Trainer

    cfg = compose_cfg(f"model.pretrained_path={tiny_stack_dir}", "train.max_bad_steps=2", "train.max_steps=5",
                      "train.save_every=1", "data.val=null")
    distributed.init(torch.device("cpu"))
    engine = build_engine(cfg, build_ds_config(cfg, 1, on_gpu=False), torch.device("cpu"), 10)
    from gill.training.recipe import build_loader

    loader, sampler = build_loader(SyntheticLayoutDataset(16, resolution=64), cfg.train, True, 0)
    trainer = Trainer(cfg, engine, loader, sampler, None, {}, tmp_path)
    real = mode_fns.retrieval
    calls = {"n": 0}

    def sometimes_nan(model, batch):
        calls["n"] += 1
        out = real(model, batch)
        if calls["n"] >= 2:  # step 1 is clean, then every step is poisoned
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(mode_fns, "retrieval", sometimes_nan)
    with pytest.raises(NonFiniteLossError, match="2 consecutive"):
        trainer.fit()
    after_clean = load_file(tmp_path / "adapter.safetensors")  # exported at step 1
    final = {k: v.float() for k, v in engine.module.adapter.state_dict().items()}
    for k, v in after_clean.items():
        assert torch.isfinite(v).all()
        assert torch.equal(v, final[k]), f"a skipped step changed {k}"
    assert [p.name for p in CheckpointManager(tmp_path).complete()] == ["step_00000001"]


def test_gc_freeze_after_freezes_the_heap_once_and_releases_it(tiny_stack_dir, tmp_path, monkeypatch):
    """``train.gc_freeze_after=N``: the objects alive after the run's N-th step go to the collector's permanent
    generation (full collections then skip the stack and compiled graphs), once; when ``fit`` ends they are released,
    so what the run built can be collected (a one-process sweep's next job)."""
    import gc

    from gill.training import trainer as trainer_mod
    from gill.training.recipe import run

    steps, frozen = [], []
    real_step, real_freeze = trainer_mod.optimizer_step, trainer_mod.freeze_heap
    monkeypatch.setattr(trainer_mod, "optimizer_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    monkeypatch.setattr(trainer_mod, "freeze_heap", lambda: real_freeze() or frozen.append((len(steps), gc.get_freeze_count())))
    run(compose_cfg(f"model.pretrained_path={tiny_stack_dir}", f"train.output_dir={tmp_path / 'run'}",
                    "train.max_steps=3", "train.gc_freeze_after=2", "train.save_every=0", "data.val=null"))
    assert len(steps) == 3
    assert len(frozen) == 1 and frozen[0][0] == 2 and frozen[0][1] > 10_000, frozen
    assert gc.get_freeze_count() == 0
