"""timm 1.0.31 as the oracle: its random-weight models, saved in every format we load, give our logits exactly."""

from __future__ import annotations

import pytest
import torch

import coatvit

timm = pytest.importorskip("timm")
from timm.models.coat import CoaT as TimmCoaT  # noqa: E402

NAMES = coatvit.list_models()


def timm_model(name: str, img_size) -> torch.nn.Module:
    if name == "coat_test":  # not in timm's registry: build timm's class with the same architecture
        cfg = coatvit.get_config(name)
        return TimmCoaT(img_size=img_size, patch_size=4, embed_dims=list(cfg.embed_dims),
                        serial_depths=list(cfg.serial_depths), parallel_depth=cfg.parallel_depth,
                        mlp_ratios=list(cfg.mlp_ratios), num_classes=cfg.num_classes)
    return timm.create_model(name, img_size=img_size)


def authors_checkpoint(state: dict, name: str) -> dict:
    """The authors' release layout: {'model': state dict with alias keys and their unused norm layers}."""
    state = dict(state)
    dims = coatvit.get_config(name).embed_dims
    unused = ["norm1"] if coatvit.get_config(name).parallel_depth else ["norm1", "norm2", "norm3"]
    for norm in unused:
        i = int(norm[-1]) - 1
        state[f"{norm}.weight"] = torch.randn(dims[i])
        state[f"{norm}.bias"] = torch.randn(dims[i])
    return {"model": state, "epoch": 299}


@pytest.mark.parametrize("name", NAMES)
def test_all_formats_give_timm_logits(name, tmp_path):
    from safetensors.torch import save_model

    torch.manual_seed(0)
    ref_224 = timm_model(name, 224).eval()
    for p in ref_224.parameters():  # LN/bias inits are constants: perturb so every tensor matters
        p.data.add_(torch.randn_like(p) * 0.02)
    ref_wide = timm_model(name, (256, 320)).eval()
    ref_wide.load_state_dict(ref_224.state_dict())

    state = ref_224.state_dict()  # includes the alias keys of shared modules
    files = {
        "timm.safetensors": tmp_path / "model.safetensors",
        "timm.pth": tmp_path / "pytorch_model.pth",
        "authors.pth": tmp_path / f"{name}_deadbeef.pth",
    }
    save_model(ref_224, str(files["timm.safetensors"]))  # deduplicates aliases, as the Hub files are
    torch.save(state, files["timm.pth"])
    torch.save(authors_checkpoint(state, name), files["authors.pth"])

    x224 = torch.randn(2, 3, 224, 224)
    x_wide = torch.randn(2, 3, 256, 320)
    with torch.no_grad():
        want_224, want_wide = ref_224(x224), ref_wide(x_wide)
    for fmt, path in files.items():
        model = coatvit.create_model(name, weights=path).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x224), want_224, rtol=0, atol=1e-5, msg=f"{fmt} at 224")
            torch.testing.assert_close(model(x_wide), want_wide, rtol=0, atol=1e-5, msg=f"{fmt} at 256x320")


def test_our_file_roundtrip_keeps_config_and_classes(tmp_path):
    model = coatvit.create_model("coat_test", use_cpe=True, drop_path_rate=0.1)
    path = coatvit.save_weights(model, tmp_path / "w.safetensors", class_names=[str(i) for i in range(10)])
    state, meta = coatvit.read_weights(path)
    assert coatvit.CoaTConfig.from_dict(meta["config"]) == model.config
    assert meta["class_names"][3] == "3"
    again = coatvit.create_model("coat_test", weights=path)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    pth = coatvit.save_weights(model, tmp_path / "w.pth")
    assert coatvit.read_weights(pth)[1]["model_name"] == "coat_test"


def test_mismatch_names_keys_and_shapes(tmp_path):
    lite = coatvit.create_model("coat_lite_tiny")
    # Another variant's file: the error says which model it was made for.
    with pytest.raises(coatvit.WeightsError, match=r"they are coat_lite_tiny weights \(174 keys missing, 0 unexp"):
        coatvit.load_weights(coatvit.create_model("coat_tiny"), lite.state_dict())
    with pytest.raises(coatvit.WeightsError, match=r"they are coat_lite_tiny weights .* shape conflicts here\); "
                                                    r"build that model instead \(CLI: --model coat_lite_tiny\)"):
        coatvit.load_weights(coatvit.create_model("coat_lite_mini"), lite.state_dict())
    # A file that fits no variant: the keys and shapes themselves are named.
    state = {k: v for k, v in lite.state_dict().items() if not k.startswith("serial_blocks4.")}
    with pytest.raises(coatvit.WeightsError,
                       match=r"missing 24 keys: serial_blocks4.0.factoratt_crpe.proj.bias, .*\(\+18 more\)"):
        coatvit.load_weights(coatvit.create_model("coat_lite_tiny"), state)
    state = dict(lite.state_dict())
    state["patch_embed1.proj.weight"] = torch.zeros(64, 3, 4, 5)
    with pytest.raises(coatvit.WeightsError, match=r"shape conflicts: patch_embed1.proj.weight \(64, 3, 4, 5\) vs"):
        coatvit.load_weights(coatvit.create_model("coat_lite_tiny"), state)
    state = dict(lite.state_dict())
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(coatvit.WeightsError, match=r"unexpected 1 keys: extra.weight"):
        coatvit.load_weights(coatvit.create_model("coat_lite_tiny"), state)


def test_head_reinitialised_only_when_asked(tmp_path):
    model = coatvit.create_model("coat_test")  # 10 classes
    path = coatvit.save_weights(model, tmp_path / "w.safetensors")
    # The file decides the class count when the user does not.
    assert coatvit.create_model("coat_test", weights=path, num_classes=None).num_classes == 10
    five = coatvit.create_model("coat_test", num_classes=5)
    with pytest.raises(coatvit.WeightsError, match="pass num_classes"):
        coatvit.load_weights(five, path)
    fresh = coatvit.create_model("coat_test", weights=path, num_classes=5)
    assert fresh.head.out_features == 5
    assert torch.equal(fresh.patch_embed1.proj.weight, model.patch_embed1.proj.weight)


def test_conflicting_alias_values_are_refused():
    model = coatvit.create_model("coat_test")
    state = dict(model.state_dict())
    state["serial_blocks1.0.cpe.proj.weight"] = state["cpe1.proj.weight"] + 1
    with pytest.raises(coatvit.WeightsError, match="different values for aliases"):
        coatvit.load_weights(coatvit.create_model("coat_test"), state)


def test_ddp_and_compile_prefixes_are_stripped():
    model = coatvit.create_model("coat_test")
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    other = coatvit.load_weights(coatvit.create_model("coat_test"), state)
    assert torch.equal(other.cls_token2, model.cls_token2)


def test_mismatch_names_a_variant_with_more_modules_than_the_model():
    """A CoaT file loaded into a Lite model: keys the Lite model lacks (final norms 2-3) must not hide the match."""
    coat_tiny = coatvit.create_model("coat_tiny").state_dict()
    with pytest.raises(coatvit.WeightsError, match=r"they are coat_tiny weights .*--model coat_tiny\)"):
        coatvit.load_weights(coatvit.create_model("coat_lite_tiny"), coat_tiny)
