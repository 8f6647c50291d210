"""The training loop and its reusable pieces (coatvit.train), on the tiny model and tiny built-in images."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import coatvit
from coatvit import cli
from coatvit.data import BUILTIN_CLASSES
from coatvit.errors import ConfigError
from coatvit.train import (NonFiniteLossError, TrainConfig, load_checkpoint, lr_at, param_groups, read_csv,
                           resolve_config, train)

SUMMARY_COLUMNS = ["epoch", "lr", "train_loss", "eval_loss", "eval_top1", "eval_top5", "images_per_s",
                   "wall_time_s", "skipped_images"]


@pytest.fixture(autouse=True)
def one_thread():
    # One thread per process: fastest on a shared 2-core machine, and what the DDP subprocesses use too.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small(tmp_path, **overrides) -> TrainConfig:
    """A seconds-long run: coat_test at 32 px on 64 built-in images, 4 steps of 16 per epoch."""
    base = dict(model="coat_test", img_size=(32, 32), batch_size=16, epochs=2, builtin_train_size=64,
                builtin_val_size=32, workers=0, threads=1, output=str(tmp_path), experiment="run",
                log_interval=1000, warmup_epochs=0.5, curves=False)
    base.update(overrides)
    return TrainConfig(**base)


def state_of(path: Path, key: str = "model") -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[key]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------------------
# pieces


def test_lr_at_warmup_then_cosine():
    kw = dict(base_lr=1e-3, total_steps=100, warmup_steps=10, warmup_lr=1e-6, min_lr=1e-5)
    assert lr_at(0, **kw) == pytest.approx(1e-6)
    assert lr_at(5, **kw) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(55, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    assert lr_at(100, **kw) == pytest.approx(1e-5)
    lrs = [lr_at(s, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(0, base_lr=1.0, total_steps=4) == 1.0  # no warmup


def test_param_groups_skip_decay_on_biases_norms_and_cls_tokens(tiny_model):
    no_decay, decay = param_groups(tiny_model, 0.05)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {"cls_token1", "cls_token4", "norm4.weight", "head.bias", "patch_embed1.norm.bias"} <= nd
    assert {"head.weight", "serial_blocks1.0.factoratt_crpe.qkv.weight", "patch_embed1.proj.weight"} <= d
    assert not any(n.endswith(".bias") for n in d)
    assert len(nd) + len(d) == len(list(tiny_model.parameters()))


def test_config_rejects_unknown_keys_wrong_types_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="did you mean epochs"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="batch_size must be an integer"):
        TrainConfig(batch_size="64")
    with pytest.raises(ConfigError, match="batch_size must be a positive"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="lr must be positive"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="must be true or false"):
        TrainConfig(model_ema="yes")
    assert TrainConfig(lr=1).lr == 1.0 and TrainConfig(img_size=[48]).img_size == (48, 48)


def test_resolve_config_precedence(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 7\nbatch-size: 64\nclip_grad: 1.0\n")
    cfg = resolve_config({"batch_size": 32}, str(tmp_path / "c.yaml"))
    assert (cfg.epochs, cfg.batch_size, cfg.clip_grad) == (7, 32, 1.0)  # flags beat the file
    assert cfg.aa == "rand-m9-mstd0.5-inc1" and cfg.mixup == 0.8 and cfg.aug_repeats == 3  # the recipe
    medium = resolve_config({"model": "coat_lite_medium"})
    assert (medium.drop_path, medium.model_ema, medium.warmup_epochs, medium.clip_grad) == (0.3, False, 20.0, 5.0)
    assert resolve_config({"model": "coat_lite_medium", "drop_path": 0.1}).drop_path == 0.1
    (tmp_path / "bad.json").write_text(json.dumps({"epochs": "ten"}))
    with pytest.raises(ConfigError, match="epochs must be an integer"):
        resolve_config({}, str(tmp_path / "bad.json"))


# ------------------------------------------------------------------------------------------------------------
# the loop


def test_a_few_steps_lower_the_loss(tmp_path):
    # 32 images, 2 steps per epoch: the model must start fitting them within 16 steps.
    cfg = small(tmp_path, epochs=8, builtin_train_size=32, builtin_val_size=16, no_aug=True, smoothing=0.0,
                aug_repeats=1, drop_path=0.0, model_ema=False, lr=3e-3, warmup_epochs=0.0, min_lr=3e-3,
                curves=True)
    result = train(cfg, argv=["test"])
    rows = read_csv(Path(result["run_dir"]) / "summary.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(8))
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0] - 0.2 and losses[-1] == min(losses), losses
    assert list(rows[0])[:len(SUMMARY_COLUMNS) - 1] == SUMMARY_COLUMNS[:-1] and "skipped_images" in rows[0]
    run = Path(result["run_dir"])
    for name in ("config.yaml", "command.txt", "env.json", "curves.png", "last.pth", "best.pth"):
        assert (run / name).is_file(), name
    env = json.loads((run / "env.json").read_text())
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] and env["git_sha"]
    assert "model: coat_test" in (run / "config.yaml").read_text() and "global_batch: 16" in (
        run / "config.yaml").read_text()
    ckpt = load_checkpoint(run / "last.pth")
    assert ckpt["epoch"] == 7 and ckpt["class_names"][0] == "disk" and ckpt["model_name"] == "coat_test"
    assert {"model", "ema", "optimizer", "scheduler", "scaler", "rng", "step", "train_config"} <= set(ckpt)


def test_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    # The full recipe: RandAugment, random erasing, mixup/cutmix, repeated augmentation, drop path, EMA.
    cfg = dict(epochs=3, drop_path=0.1, model_ema=True, model_ema_decay=0.9, lr=2e-3)
    full = train(small(tmp_path / "a", **cfg), argv=["test"])

    import coatvit.train as train_mod

    real_save = train_mod.save_checkpoint

    def stop_after_epoch_1(path, state):
        real_save(path, state)
        if Path(path).name == "last.pth" and state["epoch"] == 1:
            raise KeyboardInterrupt  # as if the job were stopped right after the checkpoint

    monkeypatch.setattr(train_mod, "save_checkpoint", stop_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train(small(tmp_path / "b", **cfg), argv=["test"])
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    run_b = tmp_path / "b" / "run"
    assert load_checkpoint(run_b / "last.pth")["epoch"] == 1
    cfg_b = resolve_config({"resume": str(run_b / "last.pth")})
    assert cfg_b.epochs == 3 and cfg_b.model_ema_decay == 0.9  # the run's own config comes back
    train(cfg_b, argv=["test"])
    a, b = Path(full["run_dir"]) / "last.pth", run_b / "last.pth"
    assert_same_tensors(state_of(a), state_of(b))
    assert_same_tensors(state_of(a, "ema"), state_of(b, "ema"))
    assert load_checkpoint(a)["step"] == load_checkpoint(b)["step"] == 12
    assert [r["epoch"] for r in read_csv(run_b / "summary.csv")] == ["0", "1", "2"]
    rows_a, rows_b = read_csv(a.parent / "summary.csv"), read_csv(run_b / "summary.csv")
    assert [r["train_loss"] for r in rows_a] == [r["train_loss"] for r in rows_b]


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    import coatvit.registry as registry

    real_create = registry.create_model

    def poisoned(*args, **kwargs):
        model = real_create(*args, **kwargs)
        seen = {"n": 0}

        def hook(module, inputs, output):
            if module.training:
                seen["n"] += 1
                if seen["n"] == 6:  # epoch 1, second step
                    return output * float("nan")
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(registry, "create_model", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 5 .*learning rate.*last good checkpoint"):
        train(small(tmp_path / "stop", model_ema=False), argv=["test"])
    assert load_checkpoint(tmp_path / "stop" / "run" / "last.pth")["epoch"] == 0

    result = train(small(tmp_path / "skip", model_ema=False, skip_nonfinite=True), argv=["test"])
    rows = read_csv(Path(result["run_dir"]) / "summary.csv")
    assert [int(r["nonfinite_steps"]) for r in rows] == [0, 1]
    assert load_checkpoint(Path(result["run_dir"]) / "last.pth")["step"] == 7
    assert all(torch.isfinite(v).all() for v in result["model"].state_dict().values())


@pytest.mark.parametrize("argv, message", [
    (["-b", "0"], "batch_size must be a positive"),
    (["--lr", "-0.1"], "lr must be positive"),
    (["--data", "/nonexistent/folder"], "does not exist"),
    (["--model", "coat_lite_tinny"], "did you mean coat_lite_tiny"),
    (["--img-size", "16"], "too small"),
    (["--weight-decay", "-1"], "weight_decay must be >= 0"),
    (["--warmup-epochs", "-1"], "warmup_epochs must be >= 0"),
    (["--mixup", "-0.5"], "mixup must be >= 0"),
    (["--model-ema-decay", "2"], "model_ema_decay must be in (0, 1)"),
    (["--val-split", "1.5"], "val_split must be in [0, 1)"),
    (["--clip-grad", "-1"], "clip_grad must be >= 0"),
    (["--max-steps-per-epoch", "0"], "max_steps_per_epoch must be a positive integer"),
    (["--scale", "0.5", "0.2"], "scale must be 0 < min <= max <= 1"),
    (["--opt-betas", "0.9", "1.0"], "opt_betas in [0, 1)"),
])
def test_bad_invocations_exit_2_with_one_line(tmp_path, capsys, argv, message):
    base = ["train", "--model", "coat_test", "--epochs", "1", "--output", str(tmp_path), "-j", "0"]
    assert cli.main(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_clip_grad_zero_means_no_clipping():
    # clipping to norm 0 would zero every gradient; the detection command's default 0 already means "off"
    assert TrainConfig(clip_grad=0.0).clip_grad is None and TrainConfig(clip_grad=5.0).clip_grad == 5.0


def test_unwritable_output_and_foreign_checkpoints_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["train", "--model", "coat_test", "--output", str(blocker / "sub"), "-j", "0"]) == 2
    assert "not writable" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("epocs: 3\n")
    assert cli.main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "did you mean epochs" in capsys.readouterr().err
    run = train(small(tmp_path, epochs=1, model_ema=False), argv=["test"])["run_dir"]
    assert cli.main(["train", "--resume", f"{run}/last.pth", "--model", "coat_lite_tiny"]) == 2
    assert "coat_test run, not coat_lite_tiny" in capsys.readouterr().err


def test_compile_flag_trains_the_compiled_model_and_saves_plain_checkpoints(tmp_path, monkeypatch):
    # `coatvit train --compile`: the training steps run through torch.compile (Dynamo + AOTAutograd here; the
    # aot_eager backend skips inductor's C++ build, minutes on 2 cores), with the eager run's losses and weights,
    # and checkpoints keep the model's own keys.
    compiled = []
    real_compile = torch.compile

    def compile_aot_eager(model, **kwargs):
        compiled.append(type(model).__name__)
        return real_compile(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    base = ["train", "--model", "coat_test", "--img-size", "32", "-b", "16", "--epochs", "1", "--builtin-train-size",
            "32", "--builtin-val-size", "16", "-j", "0", "--output", str(tmp_path), "--drop-path", "0",
            "--no-model-ema", "--no-curves", "--warmup-epochs", "0", "--threads", "1"]
    assert cli.main(base + ["--experiment", "eager"]) == 0 and compiled == []
    assert cli.main(base + ["--experiment", "compiled", "--compile"]) == 0 and compiled == ["CoaT"]
    eager_rows, compiled_rows = (read_csv(tmp_path / run / "summary.csv") for run in ("eager", "compiled"))
    for key in ("train_loss", "eval_loss"):
        assert abs(float(eager_rows[0][key]) - float(compiled_rows[0][key])) < 1e-4, key
    a, b = state_of(tmp_path / "eager" / "last.pth"), state_of(tmp_path / "compiled" / "last.pth")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_finetune_onto_new_classes_and_resolution(tmp_path):
    src = coatvit.create_model("coat_test", num_classes=3)
    coatvit.save_weights(src, tmp_path / "src.safetensors")
    result = train(small(tmp_path, epochs=1, img_size=(40, 40), finetune=str(tmp_path / "src.safetensors"),
                         model_ema=False, lr=1e-9, warmup_epochs=0.0, min_lr=1e-9, weight_decay=0.0),
                   argv=["test"])
    model = result["model"]
    assert model.num_classes == len(BUILTIN_CLASSES) == 5
    # Everything but the new classifier came from the file (lr ~ 0 keeps it there).
    for k, v in src.state_dict().items():
        if not k.startswith("head."):
            assert torch.allclose(model.state_dict()[k], v, atol=1e-6), k


# ------------------------------------------------------------------------------------------------------------
# distributed

_RANK_SCRIPT = """
import sys, torch
from coatvit.train import TrainConfig, train
cfg = TrainConfig(**__import__("json").loads(sys.argv[1]))
if cfg.compile:  # Dynamo + AOTAutograd without inductor's C++ build (minutes on 2 cores)
    real_compile = torch.compile
    torch.compile = lambda model, **kw: real_compile(model, backend="aot_eager", **kw)
result = train(cfg, argv=["ddp-test"])
torch.save(result["model"].state_dict(), sys.argv[2])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _without_key_bias(name: str, t: torch.Tensor) -> torch.Tensor:
    """A qkv bias without its k third. The softmax over tokens ignores a per-channel shift of k, so that third's
    gradient is zero up to rounding, and AdamW, which divides by the gradient's own scale, walks it on rounding
    noise: two runs that round differently (a batch of 16, or two ranks of 8) drift apart there and only there."""
    if not name.endswith("qkv.bias"):
        return t
    q, _, v = t.chunk(3)
    return torch.cat((q, v))


@pytest.mark.parametrize("per_rank, accum, compiled", [(8, 1, False), (4, 2, True)], ids=["eager", "compiled-accum"])
def test_two_process_gloo_ddp_matches_a_single_process(tmp_path, per_rank, accum, compiled):
    # 2 ranks x per_rank x accum = the single process's batch of 16; the compiled case runs DDP's no_sync through
    # torch.compile's wrapper.
    common = dict(model="coat_test", img_size=[32, 32], epochs=2, builtin_train_size=64, builtin_val_size=32,
                  workers=0, threads=1, log_interval=1000, no_aug=True, drop_path=0.0, aug_repeats=1,
                  model_ema=False, device="cpu", warmup_epochs=0.5, lr=2e-3, curves=False)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "COATVIT_DIST_TIMEOUT": "60",
               "OMP_NUM_THREADS": "1"}
        cfg = json.dumps({**common, "batch_size": per_rank, "grad_accum": accum, "compile": compiled,
                          "output": str(tmp_path / "ddp"), "experiment": "run"})
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, cfg, str(tmp_path / f"rank{rank}.pt")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("DDP run did not finish within 240 s")
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert_same_tensors(r0, r1)  # DDP keeps ranks identical
    assert not (tmp_path / "ddp" / "run").exists() or (tmp_path / "ddp" / "run" / "last.pth").is_file()
    single = train(TrainConfig(**{**common, "img_size": (32, 32), "batch_size": 16,
                                  "output": str(tmp_path / "one"), "experiment": "run"}), argv=["test"])
    ref = single["model"].state_dict()
    assert load_checkpoint(tmp_path / "one" / "run" / "last.pth")["step"] == 8
    for k in ref:
        assert torch.allclose(_without_key_bias(k, r0[k]), _without_key_bias(k, ref[k]), rtol=1e-4, atol=1e-5), k
    rows = read_csv(tmp_path / "ddp" / "run" / "summary.csv")
    assert len(rows) == 2 and math.isclose(float(rows[-1]["eval_top1"]), single["eval_top1"], abs_tol=3.2)
