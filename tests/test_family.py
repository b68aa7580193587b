import json
import shutil

import pytest
import torch
import torchvision
from torch import nn

from rescascade.cli import main
from rescascade.serve.errors import RescascadeError
from rescascade.training.backbones import resolve_arch
from rescascade.training.family import ResolutionFamily, check_resolutions
from rescascade.training.params import count_parameters
from rescascade.training.store import load_family, save_family
from rescascade.training.weights import hub_cache_path, load_state_dict_file, resolve_weights, torchvision_weights

RES = (32, 48, 64)


def random_torchvision(width=0.35, num_classes=10, seed=0):
    """A torchvision MobileNetV2 with random weights *and* random BN statistics, so every BN matters."""
    torch.manual_seed(seed)
    m = torchvision.models.mobilenet_v2(width_mult=width, num_classes=num_classes)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.1)
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.mark.parametrize("patch", ["scale_bias_stats", "scale_bias"])
@pytest.mark.parametrize("classifier", ["shared", "per_resolution"])
def test_pretrained_patched_family_equals_torchvision(patch, classifier):
    tv = random_torchvision()
    fam = ResolutionFamily(RES, num_classes=10, width_mult=0.35, patch=patch, classifier=classifier)
    fam.load_plain_state_dict(tv.state_dict())
    fam.eval()
    for r in RES:
        x = torch.randn(2, 3, r, r)
        assert torch.equal(fam(x, r), tv(x))
        assert torch.equal(fam.plain_model(r)(x), tv(x))


def test_pretrained_imagenet_family_equals_torchvision(imagenet_weights_path):
    sd = torch.load(imagenet_weights_path, weights_only=True)
    tv = torchvision.models.mobilenet_v2()
    tv.load_state_dict(sd)
    tv.eval()
    fam = ResolutionFamily((96, 128, 160, 192, 224))
    fam.load_plain_state_dict(sd)
    fam.eval()
    torch.manual_seed(0)
    for r in fam.resolutions:
        x = torch.randn(1, 3, r, r)
        assert torch.equal(fam(x, r), tv(x))


def test_new_num_classes_replaces_classifier_and_keeps_patches():
    tv = random_torchvision(num_classes=1000)
    fam = ResolutionFamily(RES, num_classes=7, width_mult=0.35)
    fam.load_plain_state_dict(tv.state_dict())
    assert fam.logits_layer.weight.shape == (7, fam.model.last_channel)
    feats = fam.eval().model.features
    x = torch.randn(1, 3, 48, 48)
    fam.set_resolution(48)
    assert torch.equal(feats(x), tv.features(x))


def test_updating_one_patch_leaves_other_resolutions_bit_identical():
    fam = ResolutionFamily(RES, num_classes=10, width_mult=0.35)
    fam.load_plain_state_dict(random_torchvision().state_dict())
    xs = {r: torch.randn(4, 3, r, r) for r in RES}
    fam.eval()
    before = {r: fam(xs[r], r).clone() for r in RES}
    opt = torch.optim.SGD(fam.patch_parameters(48), lr=0.5, momentum=0.9, weight_decay=1e-2)
    fam.train()
    for _ in range(3):  # train-mode forward also moves r048's running statistics
        loss = fam(xs[48], 48).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    fam.eval()
    after = {r: fam(xs[r], r) for r in RES}
    assert not torch.equal(after[48], before[48])
    for r in (32, 64):
        assert torch.equal(after[r], before[r])


def test_save_load_round_trip_is_bit_exact(tmp_path):
    fam = ResolutionFamily(RES, num_classes=10, width_mult=0.35, classifier="per_resolution")
    fam.load_plain_state_dict(random_torchvision().state_dict())
    with torch.no_grad():  # make every patch different
        for i, r in enumerate(RES):
            for p in fam.patch_parameters(r):
                p.add_(0.01 * (i + 1))
    save_family(fam, tmp_path / "fam", class_names=[f"c{i}" for i in range(10)])
    loaded, doc = load_family(tmp_path / "fam")
    assert doc["class_names"][3] == "c3"
    fam.eval()
    for r in RES:
        x = torch.randn(2, 3, r, r)
        assert torch.equal(loaded(x, r), fam(x, r))
        for (k1, v1), (k2, v2) in zip(sorted(fam.state_dict_for(r).items()), sorted(loaded.state_dict_for(r).items())):
            assert k1 == k2 and torch.equal(v1, v2)
    patch_bytes = (tmp_path / "fam/patches/r048.safetensors").stat().st_size
    assert patch_bytes < (tmp_path / "fam/shared.safetensors").stat().st_size / 4


def count_by_hand(tv: nn.Module):
    convs_and_linear = sum(p.numel() for m in tv.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                           for p in m.parameters())
    bn_affine = sum(m.weight.numel() + m.bias.numel() for m in tv.modules() if isinstance(m, nn.BatchNorm2d))
    bn_stats = sum(m.running_mean.numel() + m.running_var.numel()
                   for m in tv.modules() if isinstance(m, nn.BatchNorm2d))
    linear = sum(p.numel() for m in tv.modules() if isinstance(m, nn.Linear) for p in m.parameters())
    return convs_and_linear, bn_affine, bn_stats, linear


def test_parameter_counts_match_a_count_by_hand():
    tv = torchvision.models.mobilenet_v2()
    shared, affine, stats, linear = count_by_hand(tv)
    assert shared + affine == sum(p.numel() for p in tv.parameters()) == 3_504_872
    c = count_parameters(ResolutionFamily((96, 128, 160, 192, 224)))
    assert (c["shared"], c["per_patch"], c["per_patch_statistics"]) == (shared, affine, stats)
    assert c["family"] == shared + 5 * affine
    assert c["k_independent"] == 5 * 3_504_872
    assert c["family_over_one_model"] <= 1.06  # the paper's "only 5% more"
    per_res = count_parameters(ResolutionFamily((96, 128), classifier="per_resolution"))
    assert per_res["per_patch"] == affine + linear and per_res["shared"] == shared - linear
    stats_shared = count_parameters(ResolutionFamily((96, 128), patch="scale_bias"))
    assert stats_shared["per_patch_statistics"] == 0 and stats_shared["shared_statistics"] == stats


def test_info_prints_the_parameter_table(tmp_path, capsys):
    save_family(ResolutionFamily((96, 128, 160, 192, 224)), tmp_path / "fam")
    assert main(["info", str(tmp_path / "fam")]) == 0
    out = capsys.readouterr().out
    assert "3,641,320" in out and "17,524,360" in out and "1.039x" in out


# ---- bad input: one clear line each -----------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    fam = ResolutionFamily(RES, num_classes=10, width_mult=0.35)
    save_family(fam, tmp_path / "fam")
    return tmp_path / "fam"


def edit_json(path, **changes):
    doc = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            doc.pop(k)
        else:
            doc[k] = v
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("change, message", [
    (dict(arch="resnet5"), "model cannot be built here: `arch` 'torchvision:resnet5' is not one of"),
    (dict(arch="timm:resnet18"), "is not one of torchvision's classification models"),
    (dict(schema_version=99), "schema_version 99 is not supported"),
    (dict(resolutions=None), "lacks field(s) resolutions"),
    (dict(resolutions=[32, 32]), "repeat a value"),
    (dict(resolutions=[16, 32]), "below 32"),
])
def test_bad_family_json(saved, change, message):
    edit_json(saved / "family.json", **change)
    with pytest.raises(RescascadeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_family(saved)


def test_missing_patch(saved):
    (saved / "patches/r048.safetensors").unlink()
    with pytest.raises(RescascadeError, match=r"r048.safetensors is missing"):
        load_family(saved)


def test_changed_weights_fail_the_hash_check(saved):
    from safetensors.torch import load_file, save_file
    patch = load_file(saved / "patches/r048.safetensors")
    patch["features.0.1.weight"] += 1
    save_file(patch, saved / "patches/r048.safetensors")
    with pytest.raises(RescascadeError, match="does not match the sha256"):
        load_family(saved)


def test_wrong_shape_patch(saved, tmp_path):
    other = ResolutionFamily(RES, num_classes=10, width_mult=0.5)
    save_family(other, tmp_path / "other")
    shutil.copy(tmp_path / "other/patches/r048.safetensors", saved / "patches/r048.safetensors")
    with pytest.raises(RescascadeError, match=r"has shape \[\d+\] but this family needs \[\d+\]"):
        load_family(saved, verify=False)


def test_not_a_family_dir(tmp_path):
    with pytest.raises(RescascadeError, match="family.json not found"):
        load_family(tmp_path)


def test_cli_error_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err


def test_wrong_architecture_weights_file(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    sd, _ = resolve_weights(str(tmp_path / "r18.pth"))
    with pytest.raises(RescascadeError, match="written for a different architecture"):
        ResolutionFamily(RES, width_mult=0.35).load_plain_state_dict(sd)


def test_weights_file_with_pickled_code_is_refused(tmp_path):
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # a module object, not tensors
    with pytest.raises(RescascadeError, match="pickled Python objects besides tensors"):
        load_state_dict_file(tmp_path / "pickled.pth")
    with pytest.raises(RescascadeError, match="not found"):
        resolve_weights(str(tmp_path / "nope.pth"))


def test_imagenet_weights_found_in_torch_hub_cache(tmp_path, monkeypatch, imagenet_weights_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = hub_cache_path(torchvision_weights(resolve_arch("mobilenet_v2")))
    cached.parent.mkdir(parents=True)
    cached.symlink_to(imagenet_weights_path)
    sd, desc = resolve_weights("imagenet")
    assert "IMAGENET1K_V1" in desc and sd["classifier.1.weight"].shape == (1000, 1280)


def test_imagenet_weights_offline_names_weights_path(tmp_path, monkeypatch):
    import urllib.error
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):  # what torch.hub raises on a machine without network
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RescascadeError, match=r"`weights` PATH"):
        resolve_weights("imagenet")
    with pytest.raises(RescascadeError, match="unknown ImageNet weights"):
        resolve_weights("imagenet:NOPE")


def test_check_resolutions_sorts_and_validates():
    assert check_resolutions(["128", 96]) == (96, 128)
    with pytest.raises(RescascadeError, match="integers"):
        check_resolutions(["a"])
