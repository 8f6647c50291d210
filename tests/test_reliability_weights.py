"""Untrusted weight files: code-carrying pickles are refused unexecuted; cut or corrupt files give a clear error;
downloads are checked against the known sha256 prefix; the pretrained lookup works offline from a local HF cache."""

from __future__ import annotations

import builtins
import dataclasses
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch

import coatvit
from coatvit import weights as weights_io
from coatvit.config import PRETRAINED
from coatvit.errors import PretrainedUnavailableError, WeightsError
from coatvit.weights import read_weights, save_weights

# ------------------------------------------------------------------------------------------------------------
# pickles that would run code


class _Payload:
    """Unpickling this object calls `func(*args)`; every variant would create the marker file."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, _Payload]:
    return {
        "exec": _Payload(builtins.exec, (f"open({str(marker)!r}, 'w').close()",)),
        "os.system": _Payload(os.system, (f"touch '{marker}'",)),
        "open": _Payload(builtins.open, (str(marker), "w")),
        "subprocess": _Payload(subprocess.call, (["touch", str(marker)],)),
    }


def _write_zip(path: Path, obj) -> None:
    torch.save(obj, path)


def _write_legacy(path: Path, obj) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def _write_raw_pickle(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _write_pickle_protocol0(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=0))


CONTAINERS = {
    "zip.pth": _write_zip,
    "legacy.pth": _write_legacy,
    "zip.bin": _write_zip,
    "raw-pickle.pth": _write_raw_pickle,
    "protocol0.pkl": _write_pickle_protocol0,
}
PAYLOADS = ["exec", "os.system", "open", "subprocess"]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_payload_runs_when_unpickled_unsafely(tmp_path, payload):
    """Control: the payloads below are live; plain pickle.loads does create the marker."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_payloads(marker)[payload]))
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("container", list(CONTAINERS))
@pytest.mark.parametrize("payload", PAYLOADS)
def test_code_carrying_pickle_is_refused_and_never_runs(tmp_path, container, payload):
    marker = tmp_path / "marker"
    path = tmp_path / f"evil.{container}"
    # The payload sits beside real tensors, as it would in a doctored checkpoint.
    obj = {"model": coatvit.create_model("coat_test").state_dict(), "extra": _payloads(marker)[payload]}
    CONTAINERS[container](path, obj)
    assert not marker.exists()
    with pytest.raises(WeightsError) as err:
        read_weights(path)
    assert not marker.exists(), "unpickling ran the payload"
    msg = str(err.value)
    assert "\n" not in msg and "\x1b" not in msg
    assert str(path) in msg
    assert "refused" in msg or "not a weight file" in msg
    if "refused" in msg:
        assert "nothing in it was executed" in msg and "safetensors" in msg
    # The model-building path refuses it too.
    with pytest.raises(WeightsError):
        coatvit.create_model("coat_test", weights=path)
    assert not marker.exists()


def test_refusal_names_the_global(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"x": _payloads(marker)["os.system"]}, path)
    with pytest.raises(WeightsError, match=r"asks for the global (posix|os)\.system"):
        read_weights(path)


# ------------------------------------------------------------------------------------------------------------
# truncated, empty and foreign files


@pytest.fixture(scope="module")
def saved_files(tmp_path_factory) -> dict[str, bytes]:
    torch.manual_seed(0)
    model = coatvit.create_model("coat_test")
    d = tmp_path_factory.mktemp("weights")
    save_weights(model, d / "m.safetensors")
    save_weights(model, d / "m.pth")
    torch.save(model.state_dict(), d / "legacy.pth", _use_new_zipfile_serialization=False)
    return {name: (d / name).read_bytes() for name in ("m.safetensors", "m.pth", "legacy.pth")}


# Where to cut: fractions of the file, plus absolute byte counts (inside the 8-byte safetensors length, inside its
# JSON header, one byte short of complete).
CUTS = [0, 1, 7, 9, 100, 0.25, 0.5, -1]


@pytest.mark.parametrize("name", ["m.safetensors", "m.pth", "legacy.pth"])
@pytest.mark.parametrize("cut", CUTS)
def test_truncated_file_gives_clear_error(tmp_path, saved_files, name, cut):
    data = saved_files[name]
    keep = int(len(data) * cut) if isinstance(cut, float) else (len(data) + cut if cut < 0 else cut)
    path = tmp_path / name
    path.write_bytes(data[:keep])
    with pytest.raises(WeightsError) as err:
        read_weights(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    assert any(word in msg for word in ("empty", "truncated", "cut")), msg
    assert "again" in msg  # says what to do


@pytest.mark.parametrize("name", ["m.safetensors", "m.pth", "legacy.pth"])
def test_intact_files_still_load(tmp_path, saved_files, name):
    """Guards the checks above against refusing good files."""
    path = tmp_path / name
    path.write_bytes(saved_files[name])
    model = coatvit.create_model("coat_test", weights=path)
    torch.manual_seed(0)
    reference = coatvit.create_model("coat_test")
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("content", [b"<html><body>404 Not Found</body></html>\n" * 4, b"\x00" * 4096,
                                     b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"])
def test_foreign_bytes_are_not_weights(tmp_path, content):
    """What a failed download often leaves behind: an HTML error page, zeros, a Git LFS pointer."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="not a weight file"):
        read_weights(path)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        read_weights(tmp_path / "nope.safetensors")


def test_corrupt_bytes_inside_zip(tmp_path, saved_files):
    """A bit flip inside a stored tensor record of a .pth archive: an error, never a traceback."""
    data = bytearray(saved_files["m.pth"])
    start = data.find(b"data.pkl")
    data[start + 40:start + 240] = b"\xff" * 200
    path = tmp_path / "flipped.pth"
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError):
        read_weights(path)


# ------------------------------------------------------------------------------------------------------------
# downloads


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Online mode with the network replaced: the hub fails, the authors' URL is served by `_fetch_url`."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("COATVIT_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("COATVIT_CACHE", str(tmp_path / "cache"))

    def no_hub(*args, **kwargs):
        raise ConnectionError("hub unreachable (test)")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    return tmp_path / "cache"


def _no_temp_files(folder: Path) -> bool:
    return not folder.exists() or not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_sha256_mismatch_deletes_download(online, monkeypatch):
    fetched = []

    def fake_fetch(url, dst):
        fetched.append(url)
        Path(dst).write_bytes(b"tampered bytes" * 1000)

    monkeypatch.setattr(weights_io, "_fetch_url", fake_fetch)
    entry = PRETRAINED["coat_lite_tiny"]
    with pytest.raises(WeightsError) as err:
        weights_io.download_pretrained("coat_lite_tiny")
    assert fetched == [entry.url]
    msg = str(err.value)
    assert "sha256" in msg and entry.sha256_prefix in msg and "deleted" in msg
    target = online / Path(entry.url).name
    assert not target.exists()
    assert _no_temp_files(online)


def test_interrupted_download_leaves_nothing(online, monkeypatch):
    def dying_fetch(url, dst):
        Path(dst).write_bytes(b"half a file")
        raise ConnectionResetError("connection reset (test)")

    monkeypatch.setattr(weights_io, "_fetch_url", dying_fetch)
    with pytest.raises(PretrainedUnavailableError, match="not available"):
        weights_io.download_pretrained("coat_lite_tiny")
    assert not (online / Path(PRETRAINED["coat_lite_tiny"].url).name).exists()
    assert _no_temp_files(online)


def test_matching_download_is_kept_and_loads(online, monkeypatch, tmp_path):
    """The positive path: a download whose digest matches the known prefix is used (coat_test given an entry)."""
    torch.manual_seed(1)
    source = coatvit.create_model("coat_test")
    good = tmp_path / "good.pth"
    save_weights(source, good)
    entry = dataclasses.replace(PRETRAINED["coat_lite_tiny"], hub_id="timm/coat_test.in1k",
                                sha256_prefix=weights_io.sha256_of(good)[:8], num_classes=10)
    monkeypatch.setitem(PRETRAINED, "coat_test", entry)
    monkeypatch.setattr(weights_io, "_fetch_url", lambda url, dst: Path(dst).write_bytes(good.read_bytes()))
    model = coatvit.create_model("coat_test", pretrained=True)
    assert (online / Path(entry.url).name).is_file()
    for (k, a), b in zip(model.state_dict().items(), source.state_dict().values()):
        assert torch.equal(a, b), k


def test_offline_pretrained_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("COATVIT_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(weights_io, "_fetch_url", lambda *a: pytest.fail("offline mode must not download"))
    with pytest.raises(PretrainedUnavailableError) as err:
        coatvit.create_model("coat_lite_tiny", pretrained=True)
    msg = str(err.value)
    assert "offline" in msg and "timm/coat_lite_tiny.in1k" in msg and "--weights" in msg and "\n" not in msg


def test_no_pretrained_for_test_model():
    with pytest.raises(PretrainedUnavailableError, match="no pretrained weights are released for 'coat_test'"):
        coatvit.create_model("coat_test", pretrained=True)


def test_local_hf_cache_loads_offline(monkeypatch, tmp_path):
    """A Hugging Face cache laid out as the hub client leaves it (refs/main -> snapshots/<rev>/) loads offline."""
    torch.manual_seed(2)
    source = coatvit.create_model("coat_test")
    monkeypatch.setitem(PRETRAINED, "coat_test",
                        dataclasses.replace(PRETRAINED["coat_lite_tiny"], hub_id="timm/coat_test.in1k", num_classes=10))
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--timm--coat_test.in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    save_weights(source, repo / "snapshots" / revision / "model.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("COATVIT_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(weights_io, "_fetch_url", lambda *a: pytest.fail("a cached file must not be downloaded"))
    model = coatvit.create_model("coat_test", pretrained=True)
    assert model.pretrained_entry is PRETRAINED["coat_test"]
    for (k, a), b in zip(model.state_dict().items(), source.state_dict().values()):
        assert torch.equal(a, b), k


# ------------------------------------------------------------------------------------------------------------
# the same files through every command that reads weights or checkpoints


@pytest.fixture(scope="module")
def an_image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.new("RGB", (40, 40), (10, 200, 30)).save(path)
    return path


def _commands(path: Path, image: Path, out: Path) -> dict[str, list[str]]:
    return {
        "predict": ["predict", "--weights", str(path), "--model", "coat_test", str(image), "--device", "cpu"],
        "eval": ["eval", "--weights", str(path), "--model", "coat_test", "--data", str(image.parent), "-j", "0",
                 "--device", "cpu"],
        "train --resume": ["train", "--resume", str(path)],
        "train --finetune": ["train", "--model", "coat_test", "--finetune", str(path), "--img-size", "32", "-j", "0",
                             "--epochs", "1", "-b", "8", "--builtin-train-size", "16", "--output", str(out)],
    }


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("command", ["predict", "eval", "train --resume", "train --finetune"])
@pytest.mark.parametrize("container", ["zip.pth", "legacy.pth"])
def test_every_command_refuses_code_carrying_files(tmp_path, capsys, an_image, command, container):
    from coatvit.cli import main

    marker = tmp_path / "marker"
    path = tmp_path / f"evil.{container}"
    # Shaped like a training checkpoint, so that each command gets as far as it can before reading the payload.
    CONTAINERS[container](path, {"model": coatvit.create_model("coat_test").state_dict(), "epoch": 0,
                                 "train_config": {"model": "coat_test"}, "x": _payloads(marker)["os.system"]})
    assert main(_commands(path, an_image, tmp_path / "runs")[command]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("coatvit ")]
    assert len(lines) == 1 and "Traceback" not in err and "refused" in lines[0], err
    assert not marker.exists()


@pytest.mark.parametrize("command", ["predict", "eval", "train --resume", "train --finetune"])
@pytest.mark.parametrize("cut", [0, 1, 100, 0.5, -1])
def test_every_command_reports_a_cut_checkpoint(tmp_path, capsys, an_image, command, cut):
    """A training checkpoint (the file --resume, eval and predict read) cut short at several points."""
    from coatvit.cli import main
    from coatvit.train import save_checkpoint

    full = tmp_path / "full.pth"
    save_checkpoint(full, {"model": coatvit.create_model("coat_test").state_dict(), "epoch": 0,
                           "model_name": "coat_test", "train_config": {"model": "coat_test"}})
    data = full.read_bytes()
    keep = int(len(data) * cut) if isinstance(cut, float) else (len(data) + cut if cut < 0 else cut)
    path = tmp_path / "last.pth"
    path.write_bytes(data[:keep])
    assert main(_commands(path, an_image, tmp_path / "runs")[command]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("coatvit ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(path) in lines[0] and any(w in lines[0] for w in ("empty", "truncated", "cut", "bytes long")), lines[0]
