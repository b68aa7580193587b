"""Any BatchNorm CNN as a resolution family: the family invariants over torchvision's and timm's architectures."""
import importlib.util
import json
import warnings

import pytest
import torch
from torch import nn

from rescascade.cli import main
from rescascade.profiling.export import EXPORTER_ENV, export_resolution, export_shared
from rescascade.serve.errors import ConfigError, RescascadeError
from rescascade.training.backbones import build_plain, resolve_arch
from rescascade.training.data import load_data
from rescascade.training.family import ResolutionFamily
from rescascade.training.store import load_family, save_family, weights_id
from rescascade.training.trainer import TrainConfig, train

RES = (32, 48)
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed (dev extra)")
ARCHS = ["mobilenet_v2", "mobilenet_v3_small", "resnet18", "efficientnet_b0", "regnet_x_400mf",
         pytest.param("timm:resnet18", marks=needs_timm),  # torch's BatchNorm2d
         pytest.param("timm:mobilenetv3_small_050", marks=needs_timm)]  # timm's BatchNormAct2d (BN, drop, act)


def random_plain(arch: str, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """The plain model with random weights *and* random BatchNorm affines and statistics, so every BN matters."""
    torch.manual_seed(seed)
    m = build_plain(resolve_arch(arch), num_classes)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def family_from(arch: str, classifier: str = "shared", patch: str = "scale_bias_stats") -> ResolutionFamily:
    fam = ResolutionFamily(RES, num_classes=10, arch=arch, classifier=classifier, patch=patch)
    fam.load_plain_state_dict(random_plain(arch).state_dict())
    return fam.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_family_equals_its_plain_model_at_every_resolution(arch):
    torch.manual_seed(0)
    fam = ResolutionFamily(RES, num_classes=10, arch=arch, classifier="per_resolution").eval()
    torch.manual_seed(0)
    plain = build_plain(resolve_arch(arch), 10).eval()  # the same init: the surgery draws no random numbers
    for r in RES:
        x = torch.randn(2, 3, r, r)
        with torch.no_grad():
            assert torch.equal(fam(x, r), plain(x))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("classifier, patch", [("shared", "scale_bias_stats"), ("per_resolution", "scale_bias")])
def test_family_from_pretrained_weights_equals_the_plain_model(arch, classifier, patch):
    plain = random_plain(arch)
    fam = family_from(arch, classifier, patch)
    for r in RES:
        x = torch.randn(2, 3, r, r)
        with torch.no_grad():
            assert torch.equal(fam(x, r), plain(x))
            assert torch.equal(fam.plain_model(r)(x), plain(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_updating_one_patch_leaves_the_others_bit_identical(arch):
    fam = family_from(arch, classifier="per_resolution")
    xs = {r: torch.randn(4, 3, r, r) for r in RES}
    with torch.no_grad():
        before = {r: fam(xs[r], r).clone() for r in RES}
    opt = torch.optim.SGD(fam.patch_parameters(48), lr=0.5, momentum=0.9, weight_decay=1e-2)
    fam.train()
    for _ in range(2):  # a train-mode forward also moves r048's running statistics
        loss = fam(xs[48], 48).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    fam.eval()
    with torch.no_grad():
        assert not torch.equal(fam(xs[48], 48), before[48])
        assert torch.equal(fam(xs[32], 32), before[32])


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_is_bit_exact_and_export_matches_pytorch(arch, tmp_path, capsys):
    fam = family_from(arch, classifier="per_resolution")
    with torch.no_grad():  # every patch different
        for i, r in enumerate(RES):
            for p in fam.patch_parameters(r):
                p.add_(0.01 * (i + 1))
    doc = save_family(fam, tmp_path / "fam", class_names=[f"c{i}" for i in range(10)])
    assert (doc["arch"], doc["source"]) == (resolve_arch(arch).name, resolve_arch(arch).source)
    loaded, doc = load_family(tmp_path / "fam")
    for r in RES:
        assert fam.state_dict_for(r).keys() == loaded.state_dict_for(r).keys()
        assert all(torch.equal(v, loaded.state_dict_for(r)[k]) for k, v in fam.state_dict_for(r).items())
        path, meta = export_resolution(loaded, tmp_path / "fam", r, weights_id(doc))  # raises past the tolerance
        assert meta["max_abs_diff"] < 1e-3
    assert main(["info", str(tmp_path / "fam")]) == 0
    out = capsys.readouterr().out
    counts = doc["parameters"]
    assert arch.split(":")[-1] in out and f"{counts['family']:,}" in out and counts["family_over_one_model"] < 1.5


# torch.export takes 5-24 s an export here (the legacy exporter 0.5-1.8 s, which the rest of the suite uses,
# conftest.py): one arch of each BatchNorm kind (timm's test model: BatchNormAct2d, 0.1 M parameters);
# benchmarks/exporters.py exports every arch above with both
@pytest.mark.parametrize("arch", ["resnet18", pytest.param("timm:test_efficientnet", marks=needs_timm)])
def test_torch_export_exports_the_shared_model_and_a_resolution_as_pytorch_computes(arch, tmp_path, monkeypatch):
    """The default exporter is torch.export's: the shared model (height and width free, BatchNorms kept by their
    state-dict names) and a plain resolution (BatchNorms folded by its optimizer) each match PyTorch at every
    resolution (export_shared and export_resolution raise past the tolerance), as small as the legacy exporter's."""
    monkeypatch.setenv(EXPORTER_ENV, "dynamo")
    fam = family_from(arch, classifier="per_resolution")
    with torch.no_grad():  # every patch different
        for i, r in enumerate(RES):
            for p in fam.patch_parameters(r):
                p.add_(0.01 * (i + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the legacy exporter warns: fails here
        shared, patches, meta = export_shared(fam, tmp_path / "dynamo", "w" * 64)
        path, one = export_resolution(fam, tmp_path / "dynamo", RES[-1], "w" * 64)
    assert (meta["exporter"], one["exporter"], meta["fallback"], one["fallback"]) == ("dynamo", "dynamo", None, None)
    assert sorted(f.name for f in (tmp_path / "dynamo" / "onnx").iterdir()) == [  # nothing else left beside them
        "r032.fp32.patch", "r048.fp32.json", "r048.fp32.onnx", "r048.fp32.patch", "shared.fp32.json",
        "shared.fp32.onnx"]
    assert set(meta["max_abs_diff"]) == {str(r) for r in RES} and max(meta["max_abs_diff"].values()) < 1e-3
    monkeypatch.setenv(EXPORTER_ENV, "legacy")
    legacy, _, old = export_shared(fam, tmp_path / "legacy", "w" * 64)
    assert old["exporter"] == "legacy" and shared.stat().st_size <= 1.01 * legacy.stat().st_size


def test_the_legacy_exporter_is_a_fallback_that_says_why(tmp_path, monkeypatch):
    """Where torch.export fails, the legacy exporter exports, a RuntimeWarning and the meta file say why; a wrong
    RESCASCADE_ONNX_EXPORTER is one line."""
    real = torch.onnx.export

    def export(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("Cannot export this graph\nmore detail")
        return real(*args, dynamo=dynamo, **kwargs)
    monkeypatch.setattr(torch.onnx, "export", export)
    monkeypatch.setenv(EXPORTER_ENV, "dynamo")
    fam = family_from("resnet18")
    with pytest.warns(RuntimeWarning, match="legacy TorchScript ONNX exporter: torch.export failed: RuntimeError: "
                                            "Cannot export this graph$"):
        _, meta = export_resolution(fam, tmp_path, RES[0], "w" * 64)
    assert meta["exporter"] == "legacy" and meta["fallback"] == "torch.export failed: RuntimeError: Cannot export " \
        "this graph" and meta["max_abs_diff"] < 1e-3
    monkeypatch.setenv(EXPORTER_ENV, "torchscript")
    with pytest.raises(ConfigError, match="RESCASCADE_ONNX_EXPORTER='torchscript': choose dynamo or legacy"):
        export_resolution(fam, tmp_path / "again", RES[0], "w" * 64)


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("timm:mobilenetv3_small_050", marks=needs_timm)])
def test_transfer_probe_and_distillation_train_on_any_arch(arch, tmp_path):
    """Transfer mode with per-resolution heads fitted by a linear probe, the lower resolution distilled from the
    frozen top one: the top resolution stays exactly as it started, the lower one learns."""
    splits = load_data("synthetic:64", seed=0, heldout_per_class=2)
    torch.manual_seed(0)
    fam = ResolutionFamily(RES, num_classes=len(splits.class_names), arch=arch, classifier="per_resolution")
    top_start = {k: v.clone() for k, v in fam.state_dict_for(48).items()}
    low_start = fam.patch_state_dict(32)
    cfg = TrainConfig(RES, epochs=1, batch_size=16, optimizer="adamw", lr=0.0, patch_lr=0.01, workers=0,
                      shared="frozen", head_init="probe", distill="teacher", freeze_top=True, patches="affine")
    train(fam, splits.train, cfg, tmp_path, log=lambda s: None)
    after, head = fam.state_dict_for(48), fam.logits_name + "."
    assert all(torch.equal(after[k], v) for k, v in top_start.items() if not k.startswith(head))
    assert not torch.equal(after[head + "weight"], top_start[head + "weight"])  # the probe fitted the top head
    assert any(not torch.equal(fam.patch_state_dict(32)[k], v) for k, v in low_start.items())


def test_cli_trains_another_arch_and_records_it(tmp_path, capsys):
    args = ["train", "--data", "synthetic:64", "--out", str(tmp_path / "fam"), "--arch", "resnet18", "--weights",
            "none", "--resolutions", "32,48", "--epochs", "1", "--batch-size", "16", "--workers", "0",
            "--heldout-per-class", "4", "--classifier", "per-resolution", "--distill", "top"]
    assert main(args) == 0
    doc = json.loads((tmp_path / "fam/family.json").read_text())
    assert (doc["arch"], doc["source"], doc["classifier"]) == ("resnet18", "torchvision", "per_resolution")
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0  # the same flags: complete
    assert main(args + ["--resume", "--arch", "resnet34"]) == 2
    assert "--arch" in capsys.readouterr().err


@pytest.mark.parametrize("arch, found", [("vit_b_16", "it normalizes with LayerNorm"),
                                         ("squeezenet1_0", "it has no normalization layers"),
                                         ("resnet5", "did you mean resnet50")])
def test_an_arch_without_batchnorm_is_one_line(arch, found, tmp_path, capsys):
    with pytest.raises(ConfigError, match=found):
        ResolutionFamily(RES, num_classes=10, arch=arch)
    assert main(["train", "--data", "synthetic:64", "--out", str(tmp_path / "f"), "--arch", arch,
                 "--weights", "none"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and found in err and "Traceback" not in err
    assert not (tmp_path / "f").exists()


def test_width_mult_only_where_the_builder_takes_it():
    with pytest.raises(ConfigError, match="applies to torchvision's MobileNets"):
        ResolutionFamily(RES, num_classes=10, arch="resnet18", width_mult=0.5)


def test_per_resolution_head_needs_a_linear_classifier():
    pytest.importorskip("timm")
    with pytest.raises(ConfigError, match="needs a Linear classifier"):  # dla34's classifier is a 1x1 convolution
        ResolutionFamily((32, 64), num_classes=10, arch="timm:dla34", classifier="per_resolution")


def test_torchvision_weights_by_the_enum_names(tmp_path, monkeypatch):
    """imagenet = IMAGENET1K_V1 where the enum has it; imagenet:TAG any member; an unknown tag lists them."""
    import urllib.error

    from rescascade.training.weights import resolve_weights, torchvision_weights
    assert torchvision_weights(resolve_arch("resnet50")).name == "IMAGENET1K_V1"
    assert torchvision_weights(resolve_arch("resnet50"), "IMAGENET1K_V2").name == "IMAGENET1K_V2"
    with pytest.raises(RescascadeError, match="choose one of IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        torchvision_weights(resolve_arch("resnet50"), "V3")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):  # what torch.hub raises on a machine without network
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RescascadeError, match=r"resnet18-f37072fd.pth or pass `weights` PATH.*torchvision resnet18"):
        resolve_weights("imagenet", "resnet18")


@needs_timm
def test_timm_pretrained_offline_names_the_file_to_get(tmp_path):
    """Offline, timm's pretrained weights stop with where to download them and --weights PATH (in a subprocess: the
    hub reads its offline switch at import)."""
    import subprocess
    import sys
    code = ("from rescascade.cli import main; import sys; sys.exit(main(['train', '--data', 'synthetic:64', '--out', "
            f"'{tmp_path / 'f'}', '--arch', 'timm:resnet18', '--resolutions', '32,48']))")
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "huggingface.co/timm/resnet18" in done.stderr and "--weights PATH" in done.stderr
    assert "Traceback" not in done.stderr


def test_loading_checks_the_recorded_arch_library_and_version(tmp_path, monkeypatch):
    save_family(family_from("resnet18"), tmp_path / "fam")
    doc = json.loads((tmp_path / "fam/family.json").read_text())
    (tmp_path / "fam/family.json").write_text(json.dumps({**doc, "arch": "resnet34", "source_version": "0.1"}))
    with pytest.raises(RescascadeError, match=r"lacks .* \(the family was built with torchvision 0.1, this is "):
        load_family(tmp_path / "fam")  # another layout than the files hold: the version is named
    (tmp_path / "fam/family.json").write_text(json.dumps({**doc, "source": "timm", "arch": "resnet18"}))
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # `import timm` fails, as where it is not installed
    with pytest.raises(RescascadeError, match=r"cannot be built here: timm models need the timm package"):
        load_family(tmp_path / "fam")


def test_torchvision_models_with_auxiliary_outputs_or_versioned_loaders():
    """GoogLeNet adds auxiliary logits in training mode; MNASNet's own loader wants version metadata."""
    fam = ResolutionFamily((64,), num_classes=10, arch="googlenet").train()
    assert fam(torch.randn(2, 3, 64, 64), 64).shape == (2, 10)
    fam = ResolutionFamily(RES, num_classes=10, arch="mnasnet0_5").eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(fam.plain_model(48)(x), fam(x, 48))


@pytest.mark.parametrize("arch, resolutions, message", [
    ("inception_v3", (32, 48), "cannot take 32x32 inputs"),
    pytest.param("timm:dla34", (32, 48), "cannot take 48x48 inputs", marks=needs_timm),
    ("timm:", RES, "give a model name after the prefix"),
    ("keras:resnet18", RES, "the prefix must be one of torchvision, timm"),
    ("timm:resnet18.a1_in1k", RES, "is a pretrained tag; give `arch` timm:resnet18 `weights` imagenet:a1_in1k"),
])
def test_an_arch_that_cannot_be_built_as_asked_is_one_line(arch, resolutions, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        ResolutionFamily(resolutions, num_classes=10, arch=arch)


def test_resume_with_another_arch_of_the_same_layout_stops(tmp_path):
    """timm's resnet18 has torchvision's state-dict names: only the recorded identity tells them apart."""
    pytest.importorskip("timm")
    splits = load_data("synthetic:64", seed=0, heldout_per_class=2)
    cfg = TrainConfig(RES, epochs=1, batch_size=16, optimizer="adamw", lr=0.001, workers=0)
    train(ResolutionFamily(RES, num_classes=8, arch="resnet18"), splits.train, cfg, tmp_path, log=lambda s: None)
    with pytest.raises(RescascadeError, match=r"holds another model: `arch` torchvision:resnet18 \(now timm:resnet18\)"):
        train(ResolutionFamily(RES, num_classes=8, arch="timm:resnet18"), splits.train, cfg, tmp_path, resume=True,
              log=lambda s: None)


def test_dropout_on_a_model_without_dropout_layers_is_refused(tmp_path):
    splits = load_data("synthetic:64", seed=0, heldout_per_class=2)
    cfg = TrainConfig(RES, epochs=1, batch_size=16, workers=0, dropout=0.5)
    with pytest.raises(ConfigError, match="no dropout layers"):
        train(ResolutionFamily(RES, num_classes=8, arch="resnet18"), splits.train, cfg, tmp_path, log=lambda s: None)


def test_weights_mistakes_are_one_line(tmp_path):
    from rescascade.training.weights import resolve_weights, torchvision_weights
    (tmp_path / "notes.pth").write_text("not a weights file")
    with pytest.raises(RescascadeError, match="damaged or not a weights file"):
        resolve_weights(str(tmp_path / "notes.pth"))
    with pytest.raises(RescascadeError, match="is a directory"):
        resolve_weights(str(tmp_path))
    assert torchvision_weights(resolve_arch("resnet50"), "imagenet1k_v2").name == "IMAGENET1K_V2"
    with pytest.raises(ConfigError, match="must be a state dict"):
        ResolutionFamily(RES, num_classes=10, arch="resnet18").load_plain_state_dict("weights.pth")
    if importlib.util.find_spec("timm"):
        with pytest.raises(RescascadeError, match="unknown pretrained tag 'nope' for timm:resnet18; choose one of "
                                                  "a1_in1k"):
            resolve_weights("imagenet:nope", "timm:resnet18")


@pytest.mark.parametrize("edit, message", [({"arch": 5}, "arch must be a model name"),
                                           ({"source": "keras"}, "source one of torchvision, timm"),
                                           ({"arch": "vit_b_16"}, "family.json: vit_b_16 has no BatchNorm")])
def test_an_edited_arch_in_family_json_is_one_line(tmp_path, edit, message):
    save_family(ResolutionFamily(RES, num_classes=10, arch="resnet18"), tmp_path / "fam")
    doc = json.loads((tmp_path / "fam/family.json").read_text())
    (tmp_path / "fam/family.json").write_text(json.dumps({**doc, **edit}))
    with pytest.raises(RescascadeError, match=message):
        load_family(tmp_path / "fam")
