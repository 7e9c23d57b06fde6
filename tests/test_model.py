"""Tests for model/: backbone sizes, head maths, freezing semantics and checkpoint handling.

Models are built at reduced width (and small ROIs) wherever the test is not about published sizes, so the
file runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import (
    build_model_from_checkpoint,
    load_checkpoint,
    load_into,
    load_published_backbone,
    save_checkpoint,
    strip_prefixes,
)
from model.swin_unetr import SwinUNETRBackbone
from model.unet import ContBatchNorm3d, UNet3D
from model.universal import (
    BACKBONES,
    NUM_HEAD_PARAMS,
    UniversalModel,
    canonical_backbone,
    dynamic_heads,
    freeze_except_heads,
    group_count,
)

CLASSES = ("spleen", "gallbladder", "liver", "aorta")
UNET_ROI = (32, 32, 32)
SWIN_ROI = (64, 64, 64)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def small_unet(classes=CLASSES, **kwargs) -> UniversalModel:
    torch.manual_seed(0)
    return UniversalModel("unet", classes, roi_size=UNET_ROI, width=kwargs.pop("width", 0.25), **kwargs)


def small_swin(classes=CLASSES) -> UniversalModel:
    torch.manual_seed(0)
    return UniversalModel("swinunetr", classes, roi_size=SWIN_ROI, width=0.25)


# --- sizes and shapes -----------------------------------------------------------------------------


def test_published_parameter_counts():
    assert n_params(UNet3D()) == pytest.approx(19.08e6, rel=0.01)
    assert n_params(SwinUNETRBackbone(img_size=(96, 96, 96))) == pytest.approx(62.19e6, rel=0.01)


def test_published_layout_keys():
    unet = UNet3D()
    assert unet.bottleneck_channels == 512 and unet.decoder_channels == 64
    keys = unet.state_dict()
    assert keys["down_tr64.ops.0.conv1.weight"].shape == (32, 1, 3, 3, 3)
    assert keys["down_tr512.ops.1.conv1.weight"].shape == (512, 256, 3, 3, 3)
    assert keys["up_tr256.up_conv.weight"].shape == (512, 512, 2, 2, 2)
    assert keys["up_tr256.ops.0.conv1.weight"].shape == (256, 768, 3, 3, 3)
    assert "up_tr64.ops.1.bn1.running_mean" in keys
    swin = SwinUNETRBackbone(img_size=96, feature_size=24)
    assert (swin.bottleneck_channels, swin.decoder_channels) == (384, 24)
    top_level = {k.split(".")[0] for k in swin.state_dict()}
    assert top_level >= {"swinViT", "encoder1", "encoder10", "decoder1", "out"}


def test_unet_forward_shapes():
    model = small_unet().eval()
    x = torch.randn(2, 1, *UNET_ROI)
    with torch.no_grad():
        bottleneck, decoder = model.backbone(x)
        task, head_input = model.encode(x)
        logits = model(x)
    assert bottleneck.shape == (2, model.backbone.bottleneck_channels, 4, 4, 4)
    assert decoder.shape == (2, model.backbone.decoder_channels, *UNET_ROI)
    assert task.shape == (2, 256) and head_input.shape == (2, 8, *UNET_ROI)
    assert logits.shape == (2, len(CLASSES), *UNET_ROI)


def test_swin_forward_shapes():
    model = small_swin().eval()
    x = torch.randn(1, 1, *SWIN_ROI)
    with torch.no_grad():
        bottleneck, decoder = model.backbone(x)
        logits = model(x)
    assert bottleneck.shape == (1, 16 * 12, 2, 2, 2)
    assert decoder.shape == (1, 12, *SWIN_ROI)
    assert logits.shape == (1, len(CLASSES), *SWIN_ROI)


def test_invalid_sizes_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        UniversalModel("swin_unetr", CLASSES, roi_size=(96, 96, 80), width=0.25)
    with pytest.raises(ValueError, match="multiple of 32"):
        SwinUNETRBackbone(img_size=32, feature_size=12)
    with pytest.raises(ValueError, match="multiple of 12"):
        UniversalModel("swin_unetr", CLASSES, roi_size=SWIN_ROI, width=0.3)
    with pytest.raises(ValueError, match="divisible by 8"):
        UniversalModel("unet", CLASSES, roi_size=(36, 32, 32), width=0.25)
    with pytest.raises(ValueError, match="duplicate"):
        UniversalModel("unet", ("liver", "liver"), roi_size=UNET_ROI, width=0.25)


def test_canonical_backbone_and_group_count():
    assert canonical_backbone("swinunetr") == "swin_unetr"
    assert canonical_backbone("SwinUNETR") == "swin_unetr"
    assert [canonical_backbone(b) for b in BACKBONES] == list(BACKBONES)
    with pytest.raises(ValueError, match="unet, swin_unetr"):
        canonical_backbone("dints")
    assert small_swin(("liver",)).config["backbone"] == "swin_unetr"
    assert [group_count(c) for c in (768, 512, 64, 48, 24, 12, 8, 20)] == [16, 16, 16, 16, 12, 12, 8, 10]


# --- BatchNorm and head maths ---------------------------------------------------------------------


def test_contbatchnorm_uses_batch_statistics_in_eval():
    torch.manual_seed(0)
    bn = ContBatchNorm3d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.fill_(5.0)  # would visibly change the output if eval used running stats
        bn.running_var.fill_(9.0)
    x = torch.randn(2, 4, 3, 3, 3) * 3 + 1
    expected = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.1, bn.eps)
    out_eval = bn.eval()(x)
    assert torch.equal(bn.running_mean, torch.full((4,), 5.0))  # eval never mutates state
    out_train = bn.train()(x)
    assert torch.equal(out_eval, out_train)
    torch.testing.assert_close(out_eval, expected)
    assert not torch.equal(bn.running_mean, torch.full((4,), 5.0))  # train mode still tracks, like the seed


def seed_dynamic_heads(head_input: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The seed's per-sample grouped-conv formulation, as an independent reference."""
    out = []
    for b in range(head_input.shape[0]):
        k = params.shape[1]
        w1, w2, w3, b1, b2, b3 = torch.split_with_sizes(params[b], [64, 64, 8, 8, 8, 1], dim=1)
        x = head_input[b : b + 1].repeat(k, 1, 1, 1, 1).reshape(1, -1, *head_input.shape[2:])
        x = F.relu(F.conv3d(x, w1.reshape(k * 8, 8, 1, 1, 1), b1.reshape(-1), groups=k))
        x = F.relu(F.conv3d(x, w2.reshape(k * 8, 8, 1, 1, 1), b2.reshape(-1), groups=k))
        out.append(F.conv3d(x, w3.reshape(k, 8, 1, 1, 1), b3.reshape(-1), groups=k))
    return torch.cat(out)


def test_dynamic_heads_match_seed_grouped_convs():
    torch.manual_seed(0)
    head_input = torch.randn(2, 8, 4, 5, 6)
    params = torch.randn(2, 3, NUM_HEAD_PARAMS)
    torch.testing.assert_close(dynamic_heads(head_input, params), seed_dynamic_heads(head_input, params))


def test_encode_decode_split_and_class_subset():
    model = small_unet().eval()
    x = torch.randn(2, 1, *UNET_ROI)
    with torch.no_grad():
        full = model(x)
        task, head_input = model.encode(x)
        torch.testing.assert_close(model.decode(task, head_input), full)
        torch.testing.assert_close(model.decode(task, head_input, [3, 1]), full[:, [3, 1]])
    with pytest.raises(ValueError, match="class indices"):
        model.decode(task, head_input, [4])


# --- freezing -------------------------------------------------------------------------------------


def test_freeze_except_heads_changes_only_tuned_controllers():
    model = small_unet()
    trainable = freeze_except_heads(model, ["gallbladder", "aorta"])
    expected = [f"controllers.{k}.{i}.{p}" for k in (1, 3) for i in (0, 2) for p in ("weight", "bias")]
    assert trainable == expected
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable

    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()  # the engine trains in train mode; frozen state must still not move
    x = torch.randn(2, 1, *UNET_ROI)
    target = (torch.rand(2, 2, *UNET_ROI) > 0.5).float()
    logits = model.decode(*model.encode(x), class_indices=model.class_indices(["gallbladder", "aorta"]))
    F.binary_cross_entropy_with_logits(logits, target).backward()
    optimizer.step()

    after = model.state_dict()
    tuned = {k for k in after if k.startswith(("controllers.1.", "controllers.3."))}
    assert tuned == set(trainable)
    for key, value in after.items():
        if key in tuned:
            assert not torch.equal(value, before[key]), f"{key} was not updated"
        else:  # parameters and buffers (BN running stats, embeddings) alike
            assert torch.equal(value, before[key]), f"frozen tensor {key} changed"
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_freeze_unknown_class_is_refused():
    model = small_unet()
    with pytest.raises(ValueError, match=r"'gall_bladder'.*valid names.*gallbladder"):
        freeze_except_heads(model, ["gall_bladder"])


# --- revseg checkpoints ---------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path: Path):
    model = small_unet().eval()
    with torch.no_grad():  # make the outputs depend on every part, not on the init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = save_checkpoint(tmp_path / "ckpts" / "model.pt", model, epoch=3, revised=["aorta"])
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left behind

    rebuilt, ckpt = build_model_from_checkpoint(path)
    assert ckpt["epoch"] == 3 and ckpt["revised"] == ["aorta"] and ckpt["config"] == model.config
    x = torch.randn(1, 1, *UNET_ROI)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model(x))
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(path, model, state_dict={})


def test_fixed_embedding_from_file_round_trip(tmp_path: Path):
    table = torch.randn(len(CLASSES), 512).half()  # like the seed's CLIP txt_encoding.pth
    torch.save(table, tmp_path / "txt_encoding.pth")
    model = small_unet(embedding=tmp_path / "txt_encoding.pth")
    assert model.config["embedding_dim"] == 512 and model.config["fixed_embedding"]
    assert model.controllers[0][0].in_channels == 256 + 512
    assert "organ_embedding" in dict(model.named_buffers())
    torch.testing.assert_close(model.organ_embedding, table.float())

    rebuilt, _ = build_model_from_checkpoint(save_checkpoint(tmp_path / "m.pt", model))
    assert torch.equal(rebuilt.organ_embedding, model.organ_embedding)

    by_name = {n: torch.randn(512) for n in ("aorta", "liver", "kidney_left")}
    torch.save(by_name, tmp_path / "named.pt")
    picked = small_unet(("liver", "aorta"), embedding=tmp_path / "named.pt")
    assert torch.equal(picked.organ_embedding, torch.stack([by_name["liver"], by_name["aorta"]]))
    with pytest.raises(ValueError, match="4 rows but the model has 2 classes"):
        small_unet(("liver", "aorta"), embedding=tmp_path / "txt_encoding.pth")


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (lambda: small_swin(), "backbone: checkpoint swin_unetr vs model unet"),
        (lambda: small_unet((*CLASSES, "pancreas")), r"class names removed from model \['pancreas'\]"),
        (lambda: small_unet(CLASSES[:3]), r"class names added in model \['aorta'\]"),
        (lambda: small_unet(CLASSES[::-1]), "class names reordered"),
        (lambda: small_unet(width=0.125), "width: checkpoint 0.125 vs model 0.25"),
        (lambda: small_unet(embedding=torch.zeros(4, 512)), "embedding dim: checkpoint 512 vs model 256"),
    ],
    ids=["backbone", "class-added", "class-removed", "class-reordered", "width", "embedding-dim"],
)
def test_mismatched_checkpoint_is_refused(tmp_path: Path, other, message: str):
    path = save_checkpoint(tmp_path / "other.pt", other())
    with pytest.raises(ValueError, match=message):
        load_into(small_unet(), load_checkpoint(path))


def test_foreign_files_are_refused_with_their_name(tmp_path: Path):
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(1)}, plain)
    with pytest.raises(ValueError, match=r"plain\.pt is not a revseg checkpoint"):
        load_checkpoint(plain)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pt is not a loadable torch checkpoint"):
        build_model_from_checkpoint(garbage)


# --- published backbones --------------------------------------------------------------------------


def test_strip_prefixes():
    assert strip_prefixes("module.backbone.down_tr64.ops.0.conv1.weight") == "down_tr64.ops.0.conv1.weight"
    assert strip_prefixes("backbone.module.swinViT.x") == "swinViT.x"
    assert strip_prefixes("GAP.0.weight") == "GAP.0.weight"


def published_state(source: torch.nn.Module, prefix: str, extra: dict[str, torch.Tensor]) -> dict:
    """A published-style state dict: the backbone plus heads/output layers, all under ``prefix``."""
    state = {f"{prefix}{k}": v.clone() for k, v in source.state_dict().items()}
    return state | {f"{prefix}{k}": v for k, v in extra.items()}


HEAD_KEYS = {
    "GAP.0.weight": torch.ones(128),
    "precls_conv.2.weight": torch.ones(8, 16, 1, 1, 1),
    "controllers.0.0.weight": torch.ones(128, 512, 1, 1, 1),
    "organ_embedding": torch.ones(32, 512),
}


@pytest.mark.parametrize("wrapper", [None, "net", "state_dict", "model"])
@pytest.mark.parametrize("prefix", ["", "module.", "backbone.", "module.backbone."])
def test_load_published_unet(tmp_path: Path, wrapper: str | None, prefix: str):
    torch.manual_seed(1)
    source = UNet3D(width=0.125)
    extra = HEAD_KEYS | {"out_tr.final_conv.weight": torch.ones(32, 8, 1, 1, 1)}
    state = published_state(source, prefix, extra)
    path = tmp_path / "unet.pth"
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 7}, path)

    model = small_unet(width=0.125)
    weights = [k for k in source.state_dict() if not k.endswith("num_batches_tracked")]
    assert load_published_backbone(model, path) == len(weights)
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key


def test_load_published_swin_skips_output_layer(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    torch.manual_seed(1)
    source = SwinUNETRBackbone(img_size=SWIN_ROI, feature_size=12, out_channels=32)
    state = published_state(source, "module.backbone.", HEAD_KEYS)
    del state["module.backbone.encoder10.layer.conv1.conv.weight"]  # reported as left unmatched
    torch.save({"net": state}, tmp_path / "swinunetr.pth")

    model = small_swin()
    out_before = model.backbone.out.conv.conv.weight.clone()
    with caplog.at_level(logging.INFO, logger="model.checkpoint"):
        loaded = load_published_backbone(model, tmp_path / "swinunetr.pth")
    transferable = [k for k in source.state_dict() if not k.startswith("out.")]
    assert loaded == len(transferable) - 1
    assert "1 backbone tensors left unmatched" in caplog.text
    assert torch.equal(model.backbone.out.conv.conv.weight, out_before)
    for key in transferable:
        if key != "encoder10.layer.conv1.conv.weight":
            assert torch.equal(model.backbone.state_dict()[key], source.state_dict()[key]), key


def test_unrelated_published_checkpoint_is_refused(tmp_path: Path):
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(64, 3, 7, 7)}}, path)
    with pytest.raises(ValueError, match=r"resnet\.pth: no tensor matches"):
        load_published_backbone(small_unet(), path)
    wrong_width = tmp_path / "wide.pth"
    torch.save(UNet3D(width=0.25).state_dict(), wrong_width)  # same names, other shapes
    with pytest.raises(ValueError, match=r"wide\.pth: no tensor matches"):
        load_published_backbone(small_unet(width=0.125), wrong_width)
