"""``emactl import``: checkpoints of the original EMANet code and of mmseg.

The two reference networks below are plain re-statements of each source's published
architecture and inference code (github XiaLiPKU/EMANet ``network.py``/``dataset.py``/
``eval.py``; mmsegmentation ``ResNetV1c``, ``EMAHead``, ``FCNHead`` and ``EncoderDecoder``),
written here with torch primitives only, never with emactl's modules. Their state dicts carry
the exact key names and shapes of the real checkpoints; the imported emactl network must
reproduce their logits in float64 and their masks through ``emactl predict``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from emactl.cli import main
from emactl.config import IMAGENET_MEAN, IMAGENET_STD, load_recipe, to_dict
from emactl.engine.checkpoint import latest_checkpoint, load_checkpoint, load_model
from emactl.errors import UserError
from emactl.importer import import_checkpoint
from emactl.predict import predict_images

from reference import max_rel_err
from runs import randomise

R50 = (3, 4, 6, 3)
CLASSES = 5


# --------------------------------------------------------------------------------------------
# Shared by both sources: the ResNet bottleneck (stride on the 3×3 conv) and its layers.


class Bottleneck(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


def res_layer(cin: int, planes: int, stride: int, dilations: list[int]) -> nn.Sequential:
    down = None
    if stride != 1 or cin != planes * 4:
        down = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
    blocks = [Bottleneck(cin, planes, stride, dilations[0], down)]
    blocks += [Bottleneck(planes * 4, planes, 1, d, None) for d in dilations[1:]]
    return nn.Sequential(*blocks)


def conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


# --------------------------------------------------------------------------------------------
# The original code: network.py (deep stem, multi-grid, EMAU, align_corners=True), dataset.py
# ((x/255 - MEAN) / MEAN, zero padding to 8k+1) and eval.py (whole image, argmax).


def original_dilations(rate: int, blocks: int, grids: list[int] | None = None) -> list[int]:
    """network.py's _make_layer: first block 1 (rate 1 or 2) or 2 (rate 4), then rate·grid[i]."""
    grids = grids or [1] * blocks
    first = {1: 1, 2: 1, 4: 2}[rate]
    return [first] + [rate * grids[i] for i in range(1, blocks)]


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = conv3(cin, cout)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class OriginalEMAU(nn.Module):
    def __init__(self, c: int, k: int, stages: int = 3) -> None:
        super().__init__()
        self.stages = stages
        mu = torch.randn(1, c, k) * (2.0 / k) ** 0.5
        self.register_buffer("mu", mu / (1e-6 + mu.norm(dim=1, keepdim=True)))
        self.conv1 = nn.Conv2d(c, c, 1)
        self.conv2 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: Tensor) -> Tensor:
        idn = x
        x = self.conv1(x)
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w)
        mu = self.mu.repeat(b, 1, 1)
        for _ in range(self.stages):
            z = torch.softmax(torch.bmm(x.transpose(1, 2), mu), dim=2)  # b n k
            z_ = z / (1e-6 + z.sum(dim=1, keepdim=True))
            mu = torch.bmm(x, z_)
            mu = mu / (1e-6 + mu.norm(dim=1, keepdim=True))
        x = F.relu(torch.bmm(mu, z.transpose(1, 2)).reshape(b, c, h, w))
        return F.relu(self.conv2(x) + idn)


class OriginalEMANet(nn.Module):
    def __init__(self, n_classes: int, layers: tuple[int, ...] = R50) -> None:
        super().__init__()
        stem = nn.Sequential(conv3(3, 64, 2), nn.BatchNorm2d(64), nn.ReLU(), conv3(64, 64), nn.BatchNorm2d(64),
                             nn.ReLU(), conv3(64, 128))
        self.extractor = nn.Sequential(
            stem, nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
            res_layer(128, 64, 1, [1] * layers[0]),
            res_layer(256, 128, 2, [1] * layers[1]),
            res_layer(512, 256, 1, original_dilations(2, layers[2])),
            res_layer(1024, 512, 1, original_dilations(4, layers[3], [1, 2, 4])),
        )
        self.fc0 = ConvBNReLU(2048, 512)
        self.emau = OriginalEMAU(512, 64)
        self.fc1 = nn.Sequential(ConvBNReLU(512, 256), nn.Dropout2d(0.1))
        self.fc2 = nn.Conv2d(256, n_classes, 1)

    def forward(self, img: Tensor) -> Tensor:
        x = self.fc2(self.fc1(self.emau(self.fc0(self.extractor(img)))))
        return F.interpolate(x, size=img.shape[-2:], mode="bilinear", align_corners=True)


def original_normalise(image: np.ndarray) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
    x = torch.from_numpy(image).double() / 255
    return ((x - mean) / mean).permute(2, 0, 1)[None]


def original_predict(net: nn.Module, image: np.ndarray) -> np.ndarray:
    x = original_normalise(image)
    h, w = x.shape[-2:]
    pad_h, pad_w = (8 + 1 - h % 8) % 8, (8 + 1 - w % 8) % 8
    x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
    with torch.no_grad():
        return net.double()(x).argmax(dim=1)[0, :h, :w].numpy()


# --------------------------------------------------------------------------------------------
# mmseg: ResNetV1c (deep stem 3→32→32→64, contract dilation), EMAHead (concat_input),
# FCNHead auxiliary head, ImageNet mean/std, whole or sliding-window inference.


class ConvModule(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, norm: bool = True, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=not norm)
        if norm:
            self.bn = nn.BatchNorm2d(cout)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if hasattr(self, "bn"):
            x = self.bn(x)
        return F.relu(x) if self.act else x


class ResNetV1c(nn.Module):
    def __init__(self, layers: tuple[int, ...] = R50) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv3(3, 32, 2), nn.BatchNorm2d(32), nn.ReLU(), conv3(32, 32), nn.BatchNorm2d(32),
                                  nn.ReLU(), conv3(32, 64), nn.BatchNorm2d(64), nn.ReLU())
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        # dilations (1, 1, 2, 4), strides (1, 2, 1, 1), contract_dilation: first block at rate // 2
        self.layer1 = res_layer(64, 64, 1, [1] * layers[0])
        self.layer2 = res_layer(256, 128, 2, [1] * layers[1])
        self.layer3 = res_layer(512, 256, 1, [1] + [2] * (layers[2] - 1))
        self.layer4 = res_layer(1024, 512, 1, [2] + [4] * (layers[3] - 1))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.layer2(self.layer1(self.maxpool(self.stem(x))))
        c3 = self.layer3(x)
        return [c3, self.layer4(c3)]


class EMAModule(nn.Module):
    def __init__(self, channels: int, num_bases: int, num_stages: int) -> None:
        super().__init__()
        self.num_stages = num_stages
        bases = torch.randn(1, channels, num_bases) * (2.0 / num_bases) ** 0.5
        self.register_buffer("bases", F.normalize(bases, dim=1, p=2))

    def forward(self, feats: Tensor) -> Tensor:
        b, c, h, w = feats.shape
        feats = feats.reshape(b, c, h * w)
        bases = self.bases.repeat(b, 1, 1)
        for _ in range(self.num_stages):
            attention = torch.softmax(torch.einsum("bcn,bck->bnk", feats, bases), dim=2)
            attention_normed = F.normalize(attention, dim=1, p=1)
            bases = F.normalize(torch.einsum("bcn,bnk->bck", feats, attention_normed), dim=1, p=2)
        return torch.einsum("bck,bnk->bcn", bases, attention).reshape(b, c, h, w)


class EMAHead(nn.Module):
    def __init__(self, n_classes: int, concat_input: bool = True) -> None:
        super().__init__()
        self.ema_module = EMAModule(512, 64, 3)
        self.ema_in_conv = ConvModule(2048, 512, 3)
        self.ema_mid_conv = ConvModule(512, 512, 1, norm=False, act=False)
        self.ema_out_conv = ConvModule(512, 512, 1, act=False)
        self.bottleneck = ConvModule(512, 256, 3)
        if concat_input:
            self.conv_cat = ConvModule(2048 + 256, 256, 3)
        self.conv_seg = nn.Conv2d(256, n_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        feats = self.ema_in_conv(x)
        recon = F.relu(self.ema_module(self.ema_mid_conv(feats)))
        output = self.bottleneck(F.relu(feats + self.ema_out_conv(recon)))
        if hasattr(self, "conv_cat"):
            output = self.conv_cat(torch.cat([x, output], dim=1))
        return self.conv_seg(output)


class FCNHead(nn.Module):
    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(ConvModule(1024, 256, 3))
        self.conv_seg = nn.Conv2d(256, n_classes, 1)


class MMSegEMANet(nn.Module):
    def __init__(self, n_classes: int, align_corners: bool = False, concat_input: bool = True) -> None:
        super().__init__()
        self.backbone = ResNetV1c()
        self.decode_head = EMAHead(n_classes, concat_input)
        self.auxiliary_head = FCNHead(n_classes)
        self.align_corners = align_corners

    def forward(self, img: Tensor) -> Tensor:
        out = self.decode_head(self.backbone(img)[1])
        return F.interpolate(out, size=img.shape[-2:], mode="bilinear", align_corners=self.align_corners)


def mmseg_normalise(image: np.ndarray) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64) * 255
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64) * 255
    return ((torch.from_numpy(image).double() - mean) / std).permute(2, 0, 1)[None]


def mmseg_predict(net: nn.Module, image: np.ndarray, slide: tuple[int, int] | None = None) -> np.ndarray:
    """EncoderDecoder.whole_inference, or slide_inference with (crop, stride)."""
    x = mmseg_normalise(image)
    net = net.double()
    with torch.no_grad():
        if slide is None:
            return net(x).argmax(dim=1)[0].numpy()
        crop, stride = slide
        h, w = x.shape[-2:]
        preds = x.new_zeros((1, CLASSES, h, w))
        count = x.new_zeros((1, 1, h, w))
        for hi in range(max(h - crop + stride - 1, 0) // stride + 1):
            for wi in range(max(w - crop + stride - 1, 0) // stride + 1):
                y2, x2 = min(hi * stride + crop, h), min(wi * stride + crop, w)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                preds[:, :, y1:y2, x1:x2] += net(x[:, :, y1:y2, x1:x2])
                count[:, :, y1:y2, x1:x2] += 1
        return (preds / count).argmax(dim=1)[0].numpy()


# --------------------------------------------------------------------------------------------
# Fixtures: checkpoint files in each source's format.


def image(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> tuple[nn.Module, Path]:
    torch.manual_seed(1)
    net = randomise(OriginalEMANet(CLASSES), seed=1, convs=True).eval()
    path = tmp_path_factory.mktemp("original") / "final.pth"
    torch.save({"net": net.state_dict(), "step": 30000}, path)
    return net, path


MMSEG_CONFIG = """model = dict(
    decode_head=dict(type='EMAHead', align_corners=True, num_stages=3),
    auxiliary_head=dict(align_corners=True),
    test_cfg=dict(mode='slide', crop_size=(33, 33), stride=(22, 22)))
"""


@pytest.fixture(scope="module")
def mmseg(tmp_path_factory) -> tuple[nn.Module, Path, nn.Module, Path]:
    """An mmseg checkpoint without config text (whole, align_corners False) and one whose
    ``meta.config`` asks for align_corners=True and 33² sliding windows with stride 22."""
    torch.manual_seed(2)
    folder = tmp_path_factory.mktemp("mmseg")
    whole = randomise(MMSegEMANet(CLASSES), seed=2, convs=True).eval()
    whole_path = folder / "emanet_whole.pth"
    names = tuple(f"class{i}" for i in range(CLASSES))
    torch.save({"meta": {"CLASSES": names, "PALETTE": [[i, i, i] for i in range(CLASSES)], "iter": 80000},
                "state_dict": whole.state_dict()}, whole_path)
    slide = randomise(MMSegEMANet(CLASSES, align_corners=True), seed=3, convs=True).eval()
    slide_path = folder / "emanet_slide.pth"
    torch.save({"meta": {"config": MMSEG_CONFIG, "iter": 80000}, "state_dict": slide.state_dict()}, slide_path)
    return whole, whole_path, slide, slide_path


# --------------------------------------------------------------------------------------------
# Conversion: every key maps, the recipe describes the source's network and round-trips.


def test_original_import_maps_every_key_and_writes_a_run(original, tmp_path):
    net, path = original
    run_dir = import_checkpoint("original", path, "orig", tmp_path)
    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    assert ckpt["iteration"] == 30000
    source_keys = [k for k in net.state_dict() if not k.endswith("num_batches_tracked")]
    own = {k for k in ckpt["model"] if not k.endswith("num_batches_tracked")}
    assert len(own) == len(source_keys)
    assert torch.equal(ckpt["model"]["head.context.mu"], net.emau.mu)
    assert torch.equal(ckpt["model"]["backbone.stem.0.6.weight"], net.extractor[0][6].weight)
    assert torch.equal(ckpt["model"]["backbone.layer4.2.conv2.weight"], net.extractor[7][2].conv2.weight)
    recipe = load_recipe(run_dir / "recipe.yaml")
    m = recipe.model
    assert (m.backbone, m.multi_grid, m.align_corners, m.output_stride) == ("resnet50_deep", [1, 2, 4], True, 8)
    assert (m.ema.bases_update, m.ema.renorm, m.ema.momentum, m.ema.grad) == ("moving_average", False, 0.9, "none")
    assert recipe.data.mean == recipe.data.std == IMAGENET_MEAN  # the original's (x/255 - MEAN) / MEAN
    assert recipe.eval.pad_multiple == 8 and recipe.data.num_classes == CLASSES
    assert to_dict(recipe) == ckpt["recipe"]  # recipe.yaml and the checkpoint's recipe agree
    assert (run_dir / "import.json").is_file() and (run_dir / "env.json").is_file()


def test_mmseg_import_maps_every_key_and_reads_meta(mmseg, tmp_path):
    whole, whole_path, _, slide_path = mmseg
    run_dir = import_checkpoint("mmseg", whole_path, "mm", tmp_path)
    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    assert torch.equal(ckpt["model"]["head.concat.0.weight"], whole.decode_head.conv_cat.conv.weight)
    assert torch.equal(ckpt["model"]["aux.classifier.weight"], whole.auxiliary_head.conv_seg.weight)
    assert torch.equal(ckpt["model"]["head.context.conv1.bias"], whole.decode_head.ema_mid_conv.conv.bias)
    recipe = load_recipe(run_dir / "recipe.yaml")
    m = recipe.model
    assert (m.backbone, m.multi_grid, m.concat_input, m.aux, m.align_corners) == ("resnet50_v1c", None, True, True, False)
    assert (m.ema.bases_update, m.ema.renorm, m.ema.momentum) == ("normed_moving_average", False, 0.9)
    assert recipe.data.class_names == [f"class{i}" for i in range(CLASSES)]
    assert recipe.data.std == IMAGENET_STD and recipe.eval.mode == "whole" and recipe.eval.pad_multiple is None
    assert to_dict(recipe) == ckpt["recipe"]
    slide = load_recipe(import_checkpoint("mmseg", slide_path, "mm_slide", tmp_path) / "recipe.yaml")
    assert slide.model.align_corners is True
    assert (slide.eval.mode, slide.eval.crop_size, slide.eval.stride) == ("slide", 33, 22)


# --------------------------------------------------------------------------------------------
# Forward passes against the re-statements (float64), and masks as the sources' inference.


def test_original_forward_matches_the_source_in_float64(original, tmp_path):
    net, path = original
    run = load_model(import_checkpoint("original", path, "orig", tmp_path))
    model = run.model.double().eval()
    x = original_normalise(image(0, 41, 49))
    with torch.no_grad():
        ours, theirs = model(x)["out"], net.double()(x)
    assert max_rel_err(ours, theirs) <= 1e-5


def test_mmseg_forward_matches_the_source_in_float64(mmseg, tmp_path):
    whole, whole_path, slide, slide_path = mmseg
    for name, net, path in (("a", whole, whole_path), ("b", slide, slide_path)):
        model = load_model(import_checkpoint("mmseg", path, name, tmp_path)).model.double().eval()
        x = mmseg_normalise(image(1, 40, 52))
        with torch.no_grad():
            ours, theirs = model(x)["out"], net.double()(x)
        assert max_rel_err(ours, theirs) <= 1e-5, name


def _masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def _write_images(folder: Path, sizes: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for i, (h, w) in enumerate(sizes):
        images[f"img{i}"] = image(10 + i, h, w)
        Image.fromarray(images[f"img{i}"]).save(folder / f"img{i}.png")
    return images


def test_predict_on_an_imported_original_run_gives_the_sources_masks(original, tmp_path):
    net, path = original
    run_dir = import_checkpoint("original", path, "orig", tmp_path)
    images = _write_images(tmp_path / "images", [(37, 45), (41, 41), (24, 50)])
    predict_images(run_dir, tmp_path / "images", tmp_path / "masks", device="cpu", progress=False)
    masks = _masks(tmp_path / "masks")
    for stem, img in images.items():
        expected = original_predict(net, img)
        assert masks[stem].shape == img.shape[:2]
        assert np.array_equal(masks[stem], expected), stem


def test_predict_on_imported_mmseg_runs_gives_the_sources_masks(mmseg, tmp_path):
    whole, whole_path, slide, slide_path = mmseg
    images = _write_images(tmp_path / "images", [(40, 52), (45, 61)])
    for name, net, path, window in (("w", whole, whole_path, None), ("s", slide, slide_path, (33, 22))):
        run_dir = import_checkpoint("mmseg", path, name, tmp_path)
        predict_images(run_dir, tmp_path / "images", tmp_path / f"masks_{name}", device="cpu", progress=False)
        masks = _masks(tmp_path / f"masks_{name}")
        for stem, img in images.items():
            assert np.array_equal(masks[stem], mmseg_predict(net, img, window)), (name, stem)


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2.


def cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error"), err
    return exc.value.code, err


def test_unknown_layout_and_truncated_file(original, tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    torch.save({"epoch": 3, "weights": [1, 2]}, junk)
    _, err = cli(["import", "original", str(junk), "--name", "x", "--out", str(tmp_path)], capsys)
    assert "unknown checkpoint layout" in err and "emau" in err
    truncated = tmp_path / "truncated.pth"
    data = original[1].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    _, err = cli(["import", "original", str(truncated), "--name", "y", "--out", str(tmp_path)], capsys)
    assert "truncated.pth" in err and "cannot load" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_wrong_source_and_other_heads_are_refused(original, mmseg, tmp_path, capsys):
    _, err = cli(["import", "mmseg", str(original[1]), "--name", "x", "--out", str(tmp_path)], capsys)
    assert "original checkpoint" in err and "emactl import original" in err
    psp = {k: v for k, v in mmseg[0].state_dict().items() if k.startswith(("backbone.", "auxiliary_head."))}
    psp["decode_head.psp_modules.0.1.conv.weight"] = torch.zeros(512, 2048, 1, 1)
    psp["decode_head.bottleneck.conv.weight"] = torch.zeros(512, 4096, 3, 3)
    psp["decode_head.conv_seg.weight"] = torch.zeros(CLASSES, 512, 1, 1)
    path = tmp_path / "pspnet.pth"
    torch.save({"meta": {}, "state_dict": psp}, path)
    _, err = cli(["import", "mmseg", str(path), "--name", "p", "--out", str(tmp_path)], capsys)
    assert "another head" in err and "psp_modules" in err


def test_class_count_comes_from_the_checkpoint(original, tmp_path, capsys):
    _, err = cli(["import", "original", str(original[1]), "--name", "x", "--out", str(tmp_path),
                  "--set", "data.num_classes=21"], capsys)
    assert "predicts 5 classes" in err and "data.num_classes" in err
    with pytest.raises(UserError, match="already exists"):
        import_checkpoint("original", original[1], "dup", tmp_path)
        import_checkpoint("original", original[1], "dup", tmp_path)


def test_import_cli_then_eval_and_ablate_from(original, tmp_path, capsys):
    """The imported run is accepted by eval and ablate --from like a trained one."""
    net, path = original
    with pytest.raises(SystemExit) as exc:
        main(["import", "original", str(path), "--name", "orig", "--out", str(tmp_path)])
    assert exc.value.code == 0
    run_dir = tmp_path / "orig"
    data = tmp_path / "data"
    images = _write_images(data / "images", [(33, 41), (30, 36)])
    (data / "masks").mkdir()
    (data / "splits").mkdir()
    for i, (stem, img) in enumerate(images.items()):
        label = np.random.default_rng(i).integers(0, CLASSES, size=img.shape[:2]).astype(np.uint8)
        Image.fromarray(label).save(data / "masks" / f"{stem}.png")
    (data / "splits" / "val.txt").write_text("img0\nimg1\n")
    common = ["--set", "data.name=folder", "--set", f"data.root={data}", "--set", "data.workers=0",
              "--set", "data.args.image_suffix=.png",
              "--set", f"data.class_names={[f'c{i}' for i in range(CLASSES)]}"]
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(run_dir), "--device", "cpu", "--no-progress", *common])
    assert exc.value.code == 0
    assert "mIoU" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["ablate", "--from", str(run_dir), "--eval-iters", "1,3", "--out", str(tmp_path / "sweeps"),
              "--device", "cpu", *common])
    assert exc.value.code == 0


def test_visualize_accepts_an_imported_run(original, tmp_path):
    """bases, recon and predictions draw an imported run (padded input, cropped maps)."""
    run_dir = import_checkpoint("original", original[1], "orig", tmp_path)
    _write_images(tmp_path / "images", [(37, 45)])
    for kind in ("bases", "recon", "predictions"):
        with pytest.raises(SystemExit) as exc:
            main(["visualize", kind, str(run_dir), "--images", str(tmp_path / "images"),
                  "--out", str(tmp_path / "figures"), "--device", "cpu"])
        assert exc.value.code == 0, kind
    assert len(list((tmp_path / "figures").glob("*.png"))) >= 3
